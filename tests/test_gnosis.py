"""``python -m kd.synthetic import``: the authors' SN-GAN checkpoints (olive-oil-ml's format), downloaded from a
local HTTP server standing in for their repository through the real download code, verified, converted and
checked against an implementation of oil's Generator written here from oil's code; every refusal; ``--file``
without network; ``load_generator``; a pool of the imported generator distilled into a student."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import pickle
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from kd import synthetic as syn
from kd.errors import KDError
from kd.generators import sngan
from kd.generators.sampling import image_generators, to_pixels
from kd.synthetic import gnosis, oil
from tests.conftest import assert_close_as, no_inception_download, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "generator-cifar100-gnosis-e500"


# ---------------------------------------------------------------- olive-oil-ml's Generator, as its code builds it
# oil/architectures/img_gen/resnetgan.py at mfinzi/olive-oil-ml e5bd8f7 (nearest upsampling; from 1adceb8 on the
# same modules with mode="bilinear"), written out here independently of kd.generators.sngan.


class Expression(nn.Module):
    def __init__(self, func):
        super().__init__()
        self.func = func

    def forward(self, *args, **kwargs):
        return self.func(*args, **kwargs)


class OilResBlockGenerator(nn.Module):
    def __init__(self, in_ch, out_ch, stride=1, mode="nearest"):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=stride, mode=mode) if stride != 1 else nn.Sequential()
        self.model = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(),
            self.upsample,
            nn.Conv2d(in_ch, out_ch, 3, 1, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, 1, padding=1))
        self.bypass = nn.Conv2d(in_ch, out_ch, 1, 1, padding=0) if in_ch != out_ch else nn.Sequential()

    def forward(self, x):
        return self.model(x) + self.bypass(self.upsample(x))


class OilGenerator(nn.Module):
    def __init__(self, z_dim=128, img_channels=3, k=256, mode="nearest"):
        super().__init__()
        self.z_dim, self.k = z_dim, k
        self.model = nn.Sequential(
            nn.Linear(z_dim, 4 * 4 * k),
            Expression(lambda z: z.view(-1, k, 4, 4)),
            OilResBlockGenerator(k, k, stride=2, mode=mode),
            OilResBlockGenerator(k, k, stride=2, mode=mode),
            OilResBlockGenerator(k, k, stride=2, mode=mode),
            nn.BatchNorm2d(k),
            nn.ReLU(),
            nn.Conv2d(k, img_channels, 3, stride=1, padding=1),
            nn.Tanh())

    def forward(self, z):
        return self.model(z)


def _trained_like(seed: int, k: int = 256) -> OilGenerator:
    """An oil Generator with random weights and random BN statistics (so eval mode depends on them)."""
    torch.manual_seed(seed)
    g = OilGenerator(k=k)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(391_000)
    return g.eval()


def _pickle_as_on_a_gpu(state: dict, path: Path, monkeypatch) -> Path:
    """``pickle.dump(state_dict)`` as the authors' logger wrote it on their GPU machine (storages tagged cuda:0)."""
    import torch.serialization as ser

    with monkeypatch.context() as mp:
        mp.setattr(ser, "location_tag", lambda storage: "cuda:0")
        path.write_bytes(pickle.dumps(state, protocol=4))
    return path


def _blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The stand-in for the authors' repository: ``root/samuelstanton/gnosis/{commit}/{path}`` holds "their"
    CIFAR-100 epoch-500 checkpoint (a pickle with GPU-tagged storages); epoch 400 is served cut off, epoch 300 is
    another generator's file; plus the reference generator and its state dict."""
    root = tmp_path_factory.mktemp("github")
    ref = _trained_like(0)
    state = ref.state_dict()
    with pytest.MonkeyPatch.context() as mp:
        authors = _pickle_as_on_a_gpu(state, root / "authors.ckpt", mp)
        other = _pickle_as_on_a_gpu(_trained_like(1).state_dict(), root / "other.ckpt", mp)
    repo = root / "samuelstanton" / "gnosis" / gnosis.COMMIT
    for epoch, data in ((500, authors.read_bytes()), (400, authors.read_bytes()[:-4096]),
                        (300, other.read_bytes())):
        path = repo / gnosis.checkpoint_path("cifar100", epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {"root": root, "authors": authors, "other": other, "ref": ref, "state": state,
            "blob": _blob(authors.read_bytes())}


@pytest.fixture(scope="module")
def server(files):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(files["root"])))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/samuelstanton/gnosis"
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/samuelstanton/gnosis"  # nothing listens there: as a machine without network


@pytest.fixture
def authors(files, server, workdir, monkeypatch):
    """The import pointed at the local server, the blob table at this test's files (epochs 300, 400 claim the
    real file's blob id, so the other and the cut-off files must be refused); temp files under ``workdir/tmp``."""
    monkeypatch.setattr(gnosis, "URL_BASE", server)
    table = {**gnosis.CHECKPOINTS}
    for epoch in (300, 400, 500):
        table[("cifar100", epoch)] = (files["blob"], *gnosis.CHECKPOINTS[("cifar100", epoch)][1:])
    monkeypatch.setattr(gnosis, "CHECKPOINTS", table)
    (workdir / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(workdir / "tmp"))
    no_inception_download(monkeypatch, workdir)
    return files


def _main(*args: str) -> int:
    try:
        syn.main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _reference_images(ref_state: dict, mode: str, z: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    ref = OilGenerator(mode=mode)
    ref.load_state_dict(ref_state)
    with torch.no_grad():
        return ref.to(dtype).eval()(z.to(dtype))


# the sums along G's chain: the linear (128 terms), two 3x3x256 convs in each of 3 blocks and the last conv
# (2304 terms each)
G_TERMS = 128 + 7 * 2304


# ---------------------------------------------------------------- the import


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_download_verify_convert_publish(authors, workdir, mode, capsys, threads):
    args = ["import", "--dataset=cifar100"] + ([f"--upsample={mode}"] if mode != "nearest" else [])
    assert _main(*args) == 0
    name = NAME + ("-bilinear" if mode == "bilinear" else "")
    g = syn.load_generator(name)
    assert not g.training and isinstance(g, nn.Module)
    z = torch.randn(2, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = g.double()(z.double())
    want = _reference_images(authors["state"], mode, z)
    assert ours.shape == (2, 3, 32, 32) and ours.abs().max() <= 1
    assert_close_as(ours, want, torch.float64, G_TERMS, msg=f"imported G vs oil's G ({mode})")
    other = _reference_images(authors["state"], "bilinear" if mode == "nearest" else "nearest", z)
    assert (ours - other).abs().max().item() > 1e-3  # the mode is honoured: the other one makes other images

    info = g.info
    path = gnosis.checkpoint_path("cifar100", 500)
    assert info["url"] == f"{gnosis.URL_BASE}/{gnosis.COMMIT}/{path}" and info["commit"] == gnosis.COMMIT
    assert info["path"] == path and info["blob_id"] == authors["blob"] and info["verified"] is True
    assert info["source_sha256"] == hashlib.sha256(authors["authors"].read_bytes()).hexdigest()
    assert (info["authors_fid"], info["authors_is"]) == (74.2617, 6.6023) and "5,000 samples" in info["authors_metric"]
    assert (info["upsample"], info["trained_upsample"], info["source_format"]) == (mode, "nearest", "pickle")
    assert (info["epoch"], info["step"], info["recipe"]) == (500, 391_000, "gnosis-fig1")
    assert info["preset"]["upsample"] == mode and info["preset"]["arch"] == "gnosis"
    manifest = json.loads((workdir / "artifacts" / name / "v0" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["generator.json", "generator.safetensors"]
    assert manifest["metadata"]["blob_id"] == authors["blob"] and manifest["metadata"]["params"] == 4_079_363
    assert not list((workdir / "tmp").glob("kd-import-*"))  # the download's temp folder is gone
    assert len(list((workdir / "wandb").glob("offline-run-*"))) == 1  # the import's W&B run (offline here)

    capsys.readouterr()
    assert _main(*args) == 0  # again: the import finished, nothing is downloaded or published
    assert "already finished" in capsys.readouterr().out
    assert sorted(p.name for p in (workdir / "artifacts" / name).glob("v*")) == ["v0"]


def test_pools_of_the_imported_generator_honour_its_upsampling(authors, workdir):
    for mode in ("nearest", "bilinear"):
        assert _main("import", "--dataset=cifar100", f"--upsample={mode}") == 0
    pools = {}
    for mode, name in (("nearest", NAME), ("bilinear", NAME + "-bilinear")):
        pool = syn.generate(syn.GenerateConfig(model=name, dataset="cifar100", num=3, batch_size=3, shard_size=3,
                                               fid="False", out=f"pool-{mode}"))
        images, meta = syn.load_pool(str(pool))
        assert meta["generator"] == "sngan" and meta["model"] == name and meta["generator_step"] == 391_000
        z = torch.stack([torch.randn(128, generator=g) for g in image_generators(range(3), 0)])
        want = to_pixels(_reference_images(authors["state"], mode, z, torch.float32).clamp(-1, 1), 32, 32)
        # float32 bound on the images: float_tol(float32, G_TERMS) = 1.9e-3, a quarter of a pixel level (1/127.5):
        # a pixel can round to its neighbouring level at most
        assert (images.int() - want.int()).abs().max() <= 1, mode
        pools[mode] = images
    assert (pools["nearest"].int() - pools["bilinear"].int()).abs().max() > 8


def test_file_without_network_and_other_oil_checkpoints(authors, workdir, monkeypatch, capsys, threads):
    monkeypatch.setattr(gnosis, "URL_BASE", _closed_port_url())
    assert _main("import", "--dataset=cifar100", f"--file={authors['authors']}") == 0
    g = syn.load_generator(NAME)
    assert g.info["blob_id"] == authors["blob"] and g.info["url"].startswith(gnosis.URL_BASE)

    # a checkpoint of oil's format that is not one of the authors' (torch.save this time): unverified, own name
    ref = _trained_like(2)
    mine = workdir / "mine.pt"
    torch.save(ref.state_dict(), mine)
    sha = hashlib.sha256(mine.read_bytes()).hexdigest()
    assert _main("import", "--source=oil", "--dataset=cifar10", f"--file={mine}") == 0
    g = syn.load_generator(f"generator-cifar10-oil-{sha[:8]}")
    info = g.info
    assert info["verified"] is False and info["source_sha256"] == sha and info["blob_id"] == _blob(mine.read_bytes())
    assert info["source_format"] == "torch.save" and info["recipe"] == "unknown" and "url" not in info
    z = torch.randn(2, 128, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours = g.double()(z.double())
    assert_close_as(ours, _reference_images(ref.state_dict(), "nearest", z), torch.float64, G_TERMS)
    capsys.readouterr()
    assert _main("import", "--source=oil", "--dataset=cifar10", f"--file={mine}") == 0
    assert "already finished" in capsys.readouterr().out


def test_load_generator_from_a_folder_and_refusals(authors, workdir):
    assert _main("import", "--dataset=cifar100") == 0
    folder = workdir / "artifacts" / NAME / "v0"
    g = syn.load_generator(folder)
    z = torch.randn(4, 128)
    with torch.no_grad():
        x = g(z)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(x, syn.load_generator(NAME)(z))
    with pytest.raises(KDError, match="no generator 'generator-cifar100-nothing' in the local store"):
        syn.load_generator("generator-cifar100-nothing")
    (workdir / "empty").mkdir()
    with pytest.raises(KDError, match="is not an SN-GAN generator"):
        syn.load_generator(workdir / "empty")


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written


class _RunsCode:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.target}",)


def _bad_files(folder: Path, files: dict) -> dict[str, Path]:
    out = {}
    out["truncated"] = folder / "truncated.ckpt"
    out["truncated"].write_bytes(files["authors"].read_bytes()[:-4096])
    out["code"] = folder / "code.ckpt"
    out["code"].write_bytes(pickle.dumps({"model.0.weight": _RunsCode(folder / "PWNED")}))
    out["zipcode"] = folder / "code.pt"
    torch.save({"model.0.weight": _RunsCode(folder / "PWNED")}, out["zipcode"])
    out["keys"] = folder / "keys.ckpt"
    out["keys"].write_bytes(pickle.dumps({f"net.{k}": v for k, v in files["state"].items()}))
    out["shapes"] = folder / "shapes.ckpt"
    out["shapes"].write_bytes(pickle.dumps(_trained_like(3, k=128).state_dict()))
    out["nan"] = folder / "nan.ckpt"
    out["nan"].write_bytes(pickle.dumps({**files["state"], "model.7.bias": torch.full((3,), float("nan"))}))
    return out


REFUSALS = [
    ("offline", [], ["cannot download", "/data/experiments/image_generation/sngan_cifar100_v0.0.5/", "--file=PATH"]),
    ("404", ["--dataset=cifar10"], ["HTTP 404", "--file=PATH"]),
    ("wrong blob", ["--epoch=300"], ["is not the authors' cifar100_generator_300.ckpt", "its git blob id is"]),
    ("cut off", ["--epoch=400"], ["is not the authors' cifar100_generator_400.ckpt", "truncated"]),
    ("file of another epoch", ["--epoch=100", "--file={authors}"], ["not cifar100 epoch 100", "--epoch=300"]),
    ("truncated", ["--source=oil", "--file={truncated}"], ["cannot be read as a state dict", "truncated"]),
    ("code", ["--source=oil", "--file={code}"], ["the global posix.system", "refused without running it"]),
    ("code in torch.save", ["--source=oil", "--file={zipcode}"],
     ["weights-only loader refuses: the global posix.system", "refused without running"]),
    ("keys", ["--source=oil", "--file={keys}"], ["missing model.0.bias", "unexpected net.model.0.bias"]),
    ("shapes", ["--source=oil", "--file={shapes}"], ["model.0.weight has shape [2048, 128], not [4096, 128]"]),
    ("nan", ["--source=oil", "--file={nan}"], ["model.7.bias holds NaN"]),
    ("authors' file as oil", ["--source=oil", "--file={authors}"], ["--source=gnosis --dataset=cifar100"]),
    ("oil without file", ["--source=oil"], ["has no download: pass --file=PATH"]),
    ("oil with epoch", ["--source=oil", "--epoch=100", "--file={keys}"], ["drop --epoch"]),
    ("epoch", ["--epoch=250"], ["--epoch must be 0, 100, 200, 300, 400 or 500, got 250"]),
    ("dataset", ["--dataset=digits"], ["unknown dataset 'digits': choose one of cifar10, cifar100"]),
    ("upsample", ["--upsample=bicubic"], ["--upsample must be nearest or bilinear"]),
    ("missing file", ["--file=nowhere.ckpt"], ["--file=nowhere.ckpt: no such file"]),
]


@pytest.mark.parametrize("case, args, needles", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line_and_write_nothing(authors, workdir, monkeypatch, capsys, case, args, needles):
    if case == "offline":
        monkeypatch.setattr(gnosis, "URL_BASE", _closed_port_url())
    (workdir / "in").mkdir()
    paths = {**{k: str(v) for k, v in _bad_files(workdir / "in", authors).items()}, "authors": str(authors["authors"])}
    capsys.readouterr()
    code = _main("import", *[a.format(**paths) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]  # one line; a download's progress bar may come before it
    assert code == 2 and err.startswith("error: ") and all(x.startswith("download ") for x in lines[:-1]), lines
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (workdir / "artifacts").exists() or not any((workdir / "artifacts").iterdir())
    assert not list((workdir / "tmp").glob("kd-import-*")) and not (workdir / "wandb").exists()
    assert not (workdir / "runs").exists() and not (workdir / "in" / "PWNED").exists()


def test_the_reader_never_runs_code_and_reads_gpu_tagged_storages(authors, tmp_path):
    state, fmt = oil.read_state_dict(authors["authors"])
    assert fmt == "pickle" and state.keys() == authors["state"].keys()
    assert all(torch.equal(state[k], authors["state"][k]) and state[k].device.type == "cpu" for k in state)
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(_RunsCode(tmp_path / "PWNED")))
    with pytest.raises(KDError, match="posix.system"):
        oil.read_state_dict(evil)
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(KDError, match="holds a list, not a state dict"):
        (tmp_path / "list.ckpt").write_bytes(pickle.dumps([1, 2]))
        oil.read_state_dict(tmp_path / "list.ckpt")
    assert gnosis.blob_id(authors["authors"]) == authors["blob"]
    assert gnosis.blob_id(tmp_path / "list.ckpt") == _blob(pickle.dumps([1, 2]))
    ours = sngan.Generator(arch="gnosis", upsample="nearest").state_dict()
    assert set(map(oil.oil_key, ours)) == set(authors["state"])  # every tensor of oil's G has its place in ours


# ---------------------------------------------------------------- a pool of the imported generator feeds a student


def _tiny_cifar100(root: Path, monkeypatch, n_train: int = 64, n_test: int = 20) -> None:
    """A CIFAR-100-format folder (``cifar-100-python``: train, test, meta) with torchvision's md5 lists made for it."""
    from torchvision.datasets import CIFAR100

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        entry = {"data": data, "fine_labels": rng.integers(0, 100, n).tolist(),
                 "coarse_labels": rng.integers(0, 20, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)],
                                                "coarse_label_names": [f"s{i}" for i in range(20)]}))

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5("train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5("test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5("meta")})


def test_a_pool_of_the_imported_generator_feeds_distillation(authors, workdir, monkeypatch):
    _tiny_cifar100(workdir / "data", monkeypatch)
    assert _main("import", "--dataset=cifar100") == 0
    pool = syn.generate(syn.GenerateConfig(model=NAME, dataset="cifar100", num=16, batch_size=16, shard_size=16,
                                           fid="False"))
    tiny = ["--dataset=cifar100", "--arch=preresnet8", "--batch_size=32", "--epochs=1"]
    assert run_main("train.py", *tiny, "--seed=0", cwd=workdir) == 0
    assert run_main("distill.py", *tiny, "--teachers=teacher-cifar100-preresnet8-s0", "--synthetic_ratio=0.25",
                    f"--synthetic_pool={pool}", cwd=workdir) == 0
    (config,) = workdir.glob("runs/student-cifar100-preresnet8-n1-t0-r0.25-*/config.json")
    config = json.loads(config.read_text())
    assert config["n_synthetic"] == 16 and config["synthetic_source"] == NAME
    assert config["synthetic_pool_sha256"] == hashlib.sha256(pool.read_bytes()).hexdigest()
