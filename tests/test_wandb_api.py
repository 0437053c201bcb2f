"""The report's W&B API use, through wandb's own public API and wandb_workspaces' Report, at the network layer.

What is replaced, and only that: the network. Every request the SDK makes goes through
``wandb.apis.public.service_api.ServiceApi.send_api_request`` (wandb-core sends it to the server);
:class:`Server` answers it in its place, as a W&B server would (GraphQL ``data`` by operation name; the
credentials check with an empty answer), and counts it. ``wandb.Api``, its ``Runs`` listings and ``Run``
objects, ``Reports``, and ``wandb_workspaces.reports.v2.Report`` with its ``save`` (projects, the runset's
project lookup, ``upsertView``) are the installed SDK's own code. The report run that logs the figures
(``wandb.init`` online: wandb-core's run stream, not a public-API request) is replaced by a function that
returns its id.
"""

from __future__ import annotations

import base64
import collections
import json
import re
import statistics

import pytest
import wandb

from kd import report
from kd.report import wandb_report
from kd.report.online import OnlineCache, read_online

ENTITY, PROJECT, STUDY = "me", "kd-fidelity", "tiny"
CONFIG_KEYS = wandb_report.GROUP_KEYS


def gid(kind: str, n) -> str:
    return base64.b64encode(f"{kind}:{n}".encode()).decode()


class Server:
    """Answers the SDK's requests as the W&B server would, for one project: its runs (``runs``, dicts) and
    its Reports (``views``); ``calls`` lists each request's GraphQL operation (``auth``: the credentials check)."""

    def __init__(self):
        self.runs: list[dict] = []
        self.views: dict[str, dict] = {}
        self.calls: list[str] = []
        self.upserts: list[dict] = []

    def ops(self) -> collections.Counter:
        return collections.Counter(c for c in self.calls if c != "auth")

    def send(self, service_api, request, timeout=None):
        from wandb.proto import wandb_api_pb2 as apb

        if request.WhichOneof("request") != "graphql_request":
            self.calls.append("auth")
            return apb.ApiResponse()
        query = request.graphql_request.query
        op = re.search(r"\b(?:query|mutation)\s+(\w+)", query).group(1)
        self.calls.append(op)
        data = getattr(self, f"_{op}")(json.loads(request.graphql_request.variables_json or "{}"), query)
        return apb.ApiResponse(graphql_response=apb.GraphQLResponse(data_json=json.dumps(data)))

    # ------------------------------------------------------------------ runs
    def _matches(self, run: dict, where: dict) -> bool:
        for key, want in where.items():
            if key == "$and":
                if not all(self._matches(run, w) for w in want):
                    return False
            elif key == "name":
                if run["name"] not in want["$in"]:
                    return False
            elif key.startswith("config."):
                if run["config"].get(key[len("config."):]) != want:
                    return False
            else:
                raise AssertionError(f"the server stand-in does not know the filter {key}")
        return True

    def _node(self, run: dict, lazy: bool) -> dict:
        node = {"id": gid("Run", run["name"]), "projectId": "1", "tags": [], "name": run["name"],
                "displayName": run["displayName"], "sweepName": None, "state": run["state"], "group": None,
                "jobType": "distill", "commit": None, "readOnly": False, "createdAt": run["createdAt"],
                "heartbeatAt": run["heartbeatAt"], "description": None, "notes": None,
                "historyLineCount": run["historyLineCount"], "user": {"name": "me", "username": "me"}}
        if not lazy:
            node.update(config=json.dumps({k: {"value": v} for k, v in run["config"].items()}),
                        summaryMetrics=json.dumps(run["summary"]), systemMetrics="{}", historyKeys=None)
        return node

    def _Runs(self, v, query):
        lazy = "LightweightRunFragment" in query
        found = [r for r in self.runs if self._matches(r, json.loads(v.get("filters") or "{}"))]
        start = int(v.get("cursor") or 0)
        page = found[start:start + v["perPage"]]
        edges = [{"node": self._node(r, lazy), "cursor": str(start + i + 1)} for i, r in enumerate(page)]
        more = start + len(page) < len(found)
        return {"project": {"internalId": "1", "runCount": len(found), "readOnly": False,
                            "runs": {"edges": edges, "pageInfo": {"endCursor": edges[-1]["cursor"] if edges else None,
                                                                  "hasNextPage": more}}}}

    def _Run(self, v, query):
        (run,) = [r for r in self.runs if r["name"] == v["name"]]
        return {"project": {"run": self._node(run, "LightweightRunFragment" in query)}}

    def _GetDefaultEntity(self, v, query):
        return {"viewer": {"id": gid("User", 1), "entity": ENTITY}}

    # ------------------------------------------------------------------ reports
    def _GetProjects(self, v, query):
        node = {"__typename": "Project", "id": gid("Project", 1), "name": PROJECT, "entityName": ENTITY,
                "createdAt": "2026-01-01T00:00:00", "isBenchmark": False, "user": None}
        return {"models": {"pageInfo": {"__typename": "PageInfo", "endCursor": None, "hasNextPage": False},
                           "edges": [{"node": node}]}}

    def _ProjectInternalId(self, v, query):
        return {"project": {"id": gid("Project", 1), "internalId": "1"}}

    def _ProjectViews(self, v, query):
        edges = [{"node": {**view, "user": {"username": "me", "photoUrl": None, "email": None}}, "cursor": view["id"]}
                 for view in self.views.values()]
        return {"project": {"allViews": {"edges": edges, "pageInfo": {"endCursor": None, "hasNextPage": False}}}}

    def _upsertView(self, v, query):
        self.upserts.append(v)
        inserted = not v.get("id")
        vid = gid("View", len(self.views) + 1) if inserted else v["id"]
        assert vid in self.views or inserted, "an update of a Report that does not exist"
        stamp = f"2026-01-01T00:00:{len(self.upserts):02d}"
        self.views[vid] = {"id": vid, "type": v["type"], "name": v["name"], "displayName": v["displayName"],
                           "description": v["description"], "spec": v["spec"], "updatedAt": stamp,
                           "createdAt": self.views.get(vid, {}).get("createdAt", stamp),
                           "project": {"id": gid("Project", 1), "name": PROJECT, "entityName": ENTITY}}
        return {"upsertView": {"view": {k: x for k, x in self.views[vid].items() if k != "createdAt"},
                               "inserted": inserted}}


def install(monkeypatch, server: Server) -> Server:
    """``server`` answers every request of the SDK from now on."""
    from wandb.apis.public.service_api import ServiceApi

    monkeypatch.setattr(ServiceApi, "send_api_request",
                        lambda service_api, request, timeout=None: server.send(service_api, request, timeout))
    return server


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    return install(monkeypatch, Server())


def student(i: int, m: int, ratio: float, trial: int, acc: float, *, state="finished", final=True, beat=1,
            source="google/ddpm-cifar10-32") -> dict:
    config = {"job": "student", "study": STUDY, "dataset": "cifar10", "arch": "preresnet56", "ensemble_size": m,
              "synthetic_ratio": ratio, "temperature": 1.0, "trial": trial,
              "teacher_names": [f"teacher-cifar10-preresnet56-s{(trial * m + k) % 9}" for k in range(m)]}
    if ratio:
        config["synthetic_source"] = source
    summary = {"test/acc": acc, "test/agreement": acc + 0.1, "test/kl": 0.3, "test/ece": 0.02,
               "teacher/test_acc": 0.9, "data/n_real": 50000, "data/n_synthetic": round(ratio * 50000),
               "_timestamp": 1_700_000_000 + i}
    if final:
        summary["final"] = True
    return {"name": f"run{i:04d}", "displayName": f"student-m{m}-t{trial}-r{ratio:g}", "state": state,
            "createdAt": "2026-01-01T00:00:00", "heartbeatAt": f"2026-01-01T00:{beat:02d}:00",
            "historyLineCount": 30, "config": config, "summary": summary}


def study(trials: int) -> list[dict]:
    """Figure 1 points of 1 and 3 teachers at ratios 0 and 0.5, ``trials`` each; then a duplicate of the first
    point (an older run of the same grid point: not counted) and a run cut off before its end."""
    runs, i = [], 0
    for m in (1, 3):
        for ratio in (0.0, 0.5):
            for trial in range(trials):
                i += 1
                runs.append(student(i, m, ratio, trial, 0.5 + 0.03 * m + 0.1 * ratio + 0.007 * trial))
    dup = student(i + 1, 1, 0.0, 0, 0.11)
    dup["summary"]["_timestamp"] = 1_600_000_000  # older than the run it duplicates
    return [*runs, dup, student(i + 2, 3, 0.5, 0, 0.12, state="crashed", final=False)]


def read(tmp_path, refresh=False):
    cache = OnlineCache(tmp_path / "cache.json", refresh)
    runs, note = read_online(STUDY, ENTITY, PROJECT, cache)
    cache.save()
    return runs, note


@pytest.mark.parametrize("trials", [2, 40])
def test_one_listing_per_study_and_no_request_per_run_also_with_a_stale_cache(server, tmp_path, trials):
    server.runs = study(trials)
    n = len(server.runs)

    runs, note = read(tmp_path)  # no cache: one full listing (config and summary come with it)
    assert server.ops() == {"GetDefaultEntity": 1, "Runs": 1} and len(runs) == n and note.startswith("pulled")
    assert runs[0].config["study"] == STUDY and runs[0].summary["test/acc"] == server.runs[0]["summary"]["test/acc"]

    server.calls.clear()  # the cache is current: one lightweight listing
    again, note = read(tmp_path)
    assert server.ops() == {"GetDefaultEntity": 1, "Runs": 1} and "unchanged" in note
    assert [vars(r) for r in again] == [vars(r) for r in runs]

    server.calls.clear()  # stale: two runs logged again, one is new; the lightweight listing + one of those 3
    server.runs[0]["heartbeatAt"], server.runs[0]["summary"]["test/acc"] = "2026-01-02T00:00:00", 0.99
    server.runs[-1].update(state="finished", heartbeatAt="2026-01-02T00:00:00")
    server.runs[-1]["summary"]["final"] = True
    server.runs.append(student(9999, 1, 0.0, 7, 0.6))
    fresh, note = read(tmp_path)
    assert server.ops() == {"GetDefaultEntity": 1, "Runs": 2}, server.calls  # and no `Run`: none per run
    assert note.startswith("3 run(s) of study tiny new or changed")
    assert fresh[0].summary["test/acc"] == 0.99 and fresh[-2].finished and fresh[-1].id == "run9999"
    assert [r.id for r in fresh] == [r["name"] for r in server.runs]

    server.calls.clear()  # and the merged cache is current again
    _, note = read(tmp_path)
    assert server.ops()["Runs"] == 1 and "unchanged" in note


def test_the_sdk_reuses_a_lazy_listing_and_loads_each_run_alone(server):
    """Why the stale cache lists the changed runs by id: the same filters again, full, would cost a request
    per run (``Api.runs`` returns its cached lazy listing, upgraded run by run)."""
    server.runs = study(2)
    api = wandb.Api(timeout=60)
    where = {"config.study": STUDY}
    list(api.runs(f"{ENTITY}/{PROJECT}", filters=where, per_page=500, lazy=True))
    list(api.runs(f"{ENTITY}/{PROJECT}", filters=where, per_page=500, lazy=False))
    assert server.ops()["Run"] == len(server.runs)


def runset_of(spec: dict, name: str) -> dict:
    sets = [rs for b in spec["blocks"] for rs in (b.get("metadata") or {}).get("runSets", []) if rs["name"] == name]
    assert len(sets) >= 1, [b.get("type") for b in spec["blocks"]]
    return sets[0]


def panel_means(server: Server, runset: dict, metric: str) -> dict[tuple, float]:
    """What W&B shows for a runset: its filters' runs, grouped by its grouping keys, the mean per group."""
    (leaf,) = runset["filters"]["filters"]  # the only filter: no study, job or state filter beside it
    assert (leaf["key"], leaf["op"]) == ({"section": "run", "name": "name"}, "IN")
    keys = [k["name"].removesuffix(".value") for k in runset["grouping"]]
    assert all(k["section"] == "config" for k in runset["grouping"])
    groups: dict[tuple, list[float]] = {}
    for run in server.runs:
        if run["name"] in leaf["value"]:
            groups.setdefault(tuple(run["config"].get(k) for k in keys), []).append(run["summary"][metric])
    return {k: statistics.fmean(v) for k, v in groups.items()}


def test_publish_updates_the_studys_report_with_exactly_the_counted_runs(server, tmp_path, monkeypatch, capsys):
    server.runs = study(2)
    logged = []
    monkeypatch.setattr(wandb_report, "log_figures",
                        lambda entity, project, study, paths: (logged.append(study) or "figs0001",
                                                               [s for s, p in paths.items() if p.suffix == ".png"]))
    argv = [f"--study={STUDY}", "--online", f"--entity={ENTITY}", f"--out={tmp_path / 'figs'}",
            f"--cache_dir={tmp_path / 'cache'}", f"--wandb_dir={tmp_path}", "--publish"]

    res = report.run_report(report.parse_args(argv))
    printed = capsys.readouterr().out
    assert len(server.views) == 1 and "W&B Report (created): http" in printed
    assert "?" not in printed.split("W&B Report (created): ")[1]  # the title, in the URL, holds no "?"
    (view,) = server.views.values()
    assert view["displayName"] == wandb_report.report_title(STUDY) and logged == [STUDY]
    first = server.ops()
    assert first["Runs"] == 1 and first["ProjectViews"] == 1 and first["upsertView"] == 1 and "Run" not in first

    spec = json.loads(view["spec"])
    live = runset_of(spec, "the runs the figures count")
    counted = sorted(r.id for g in res.groups for r in g.runs)
    assert len(counted) == 8 and "run0009" not in counted and "run0010" not in counted  # duplicate, cut off
    # W&B groups by the config's group axes and source (a key these runs do not record: under None)
    want = {tuple(g.runs[0].config.get(k) for k in wandb_report.GROUP_KEYS): g.stats["test/agreement"]["mean"]
            for g in res.groups}
    got = panel_means(server, live, "test/agreement")
    assert len(got) == 4 and {k: pytest.approx(v) for k, v in got.items()} == want  # the figures' means
    assert runset_of(spec, "report figures")["filters"]["filters"][0]["value"] == "figs0001"

    server.calls.clear()  # a run resumed and logged again (a stale cache), and the report is published again
    server.runs[2]["heartbeatAt"], server.runs[2]["summary"]["test/agreement"] = "2026-01-03T00:00:00", 0.2
    res = report.run_report(report.parse_args(argv))
    assert "W&B Report (updated): http" in capsys.readouterr().out
    assert len(server.views) == 1 and server.upserts[-1]["id"] == view["id"]  # the same Report, saved over
    second = server.ops()
    print("requests of a second publish:", dict(second), "credential checks:", server.calls.count("auth"))
    assert second["Runs"] == 2 and second["ProjectViews"] == 1 and second["upsertView"] == 1 and "Run" not in second
    live = runset_of(json.loads(server.views[view["id"]]["spec"]), "the runs the figures count")
    # W&B groups by the config's group axes and source (a key these runs do not record: under None)
    want = {tuple(g.runs[0].config.get(k) for k in wandb_report.GROUP_KEYS): g.stats["test/agreement"]["mean"]
            for g in res.groups}
    assert {k: pytest.approx(v) for k, v in panel_means(server, live, "test/agreement").items()} == want

    bigger = install(monkeypatch, Server())  # the same requests for a study five times the size: none per run
    bigger.runs = study(10)
    report.run_report(report.parse_args([*argv[:3], f"--out={tmp_path / 'big'}", f"--cache_dir={tmp_path / 'c2'}",
                                         *argv[5:]]))
    assert bigger.ops() == first


def test_the_latest_of_several_reports_with_the_title_is_updated(server, tmp_path, monkeypatch, capsys):
    old_title = f"Does KD really work? study {STUDY}"  # the title of the Reports earlier versions made
    for n, stamp in ((1, "2026-01-01T00:00:00"), (2, "2026-02-01T00:00:00"), (3, "2025-12-01T00:00:00")):
        vid = gid("View", n)
        name = old_title if n == 2 else wandb_report.report_title(STUDY)
        server.views[vid] = {"id": vid, "type": "runs", "name": f"v{n}", "displayName": name,
                             "description": "", "spec": "{}", "updatedAt": stamp, "createdAt": stamp,
                             "project": {"id": gid("Project", 1), "name": PROJECT, "entityName": ENTITY}}
    server.views[gid("View", 4)] = {**server.views[gid("View", 1)], "id": gid("View", 4), "displayName": "other",
                                    "updatedAt": "2027-01-01T00:00:00"}
    assert wandb_report.existing_report(ENTITY, PROJECT, STUDY) == (gid("View", 2), 3)
    assert server.ops() == {"GetDefaultEntity": 1, "ProjectViews": 1}
    assert wandb_report.existing_report(ENTITY, PROJECT, "another") == ("", 0)


def test_the_report_says_where_its_panels_group_a_run_elsewhere():
    runs = [report.Run(id=s["name"], name=s["displayName"], config=s["config"], summary=s["summary"])
            for s in study(1)[:4]]
    runs[0].config = {**runs[0].config, "teacher_names": ["a", "b"]}  # named with --teachers: 2 used, config says 1
    groups = report.group_students(runs, [])
    assert wandb_report.regrouped(groups) == [runs[0].label]
    rep = wandb_report.build_report(wandb_report.Target(ENTITY, PROJECT, STUDY, "cifar10", "preresnet56"),
                                    wandb_report.Content(groups, 3, "table"))
    assert "group 1 run(s) by their config's ensemble_size" in rep.blocks[0].text
    assert not wandb_report.regrouped(report.group_students(runs[1:], []))
