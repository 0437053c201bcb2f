"""The authors' own SN-GAN weights: ``python -m kd.synthetic import`` (:func:`kd.generators.load_generator` loads
an imported generator in a notebook).

The code that made Figure 1 of Stanton et al. 2021 (samuelstanton/gnosis at :data:`COMMIT`,
``gnosis/utils/checkpointing.py: load_generator``) sampled ``cifar100_generator_500.ckpt`` of the run
``sngan_cifar100_v0.0.5``, committed with its weights in that repository (the later history deletes them, so
only the pinned commit serves them). The run saved G after epochs 100, 200, 300, 400 and 500, for CIFAR-100 and
for CIFAR-10 (:data:`CHECKPOINTS`: the file's git blob id and the authors' FID and IS of that epoch, from the
run's ``train_metrics.csv``: their own measure, 5k samples against the 10k test images through torchvision's
Inception, not the standard FID). ``import``:

1. downloads ``{URL_BASE}/{COMMIT}/{path}`` into a temp folder (or takes ``--file``), with a progress bar;
2. verifies the file's git blob id (SHA-1 of ``b"blob <size>\\0"`` + its bytes: what ``git hash-object`` prints)
   against the table: a download that is cut off, damaged or replaced is refused;
3. reads the state dict without running code (:mod:`kd.synthetic.oil`) and maps it onto the repository's
   SN-GAN Generator (arch gnosis) with the upsampling it was trained with (nearest; ``--upsample=bilinear``
   samples the same weights bilinearly, as olive-oil-ml's G did from 2020-12-23 on);
4. writes ``generator.safetensors`` + ``generator.json`` (:func:`kd.generators.sngan.save_generator`, with the
   provenance: URL, commit, path, blob id, sha256, the authors' FID/IS, the upsampling) and publishes them as the
   generator artifact ``generator-{dataset}-gnosis-e{epoch}`` (``-bilinear`` appended for that mode), into the
   local store and through a W&B run, so ``generate --model=generator-cifar100-gnosis-e500`` samples it.

An import is a run like any other (:class:`kd.session.Session`, run folder ``runs/{artifact name}``): nothing is
written (no store entry, no W&B run, no run folder) unless every check passes, and an import that already
finished says so and does nothing (no download). ``--source=oil --file=PATH`` imports any other checkpoint of
the same format (e.g. one trained with the authors' code): it cannot be verified against the table, so it is
published as
``generator-{dataset}-oil-{first 8 hex digits of its sha256}``, recorded as unverified with its sha256 and blob
id, under a name that can never be taken for the authors' files. Tests point :data:`URL_BASE` at a local server
and :data:`CHECKPOINTS` at their own files (module constants; the command line has no way to change them).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from kd import names
from kd.errors import KDError, first_line
from kd.flags import check_fields, identity, setting
from kd.generators import sngan
from kd.generators.presets import FIG1_EPOCH_STEPS, GAN_PRESETS
from kd.io import sha256_file
from kd.session import Session
from kd.synthetic import oil

COMMIT = "32cc303648a01a738dfca7da8eb24188caadbfbd"
URL_BASE = "https://raw.githubusercontent.com/samuelstanton/gnosis"
RUNS = {"cifar100": "data/experiments/image_generation/sngan_cifar100_v0.0.5/trial_0/2020-12-22_01-38-17",
        "cifar10": "data/experiments/image_generation/sngan_cifar10_v0.0.5/trial_0/2020-12-22_01-38-03"}
EPOCHS = (100, 200, 300, 400, 500)
DEFAULT_EPOCH = 500  # the checkpoint Figure 1 sampled
# (dataset, epoch): (git blob id of {dataset}_generator_{epoch}.ckpt at COMMIT, the authors' FID, IS)
CHECKPOINTS = {
    ("cifar100", 100): ("48b328b4b53824c0af936a2b3c9f8da7280f4bdf", 96.2608, 6.2293),
    ("cifar100", 200): ("046470c7ef95159e75b57b0c8f3782b2b556c9aa", 92.0841, 6.4314),
    ("cifar100", 300): ("f254b2c8495159f1698cb82ff09a3ffc1e40c5ad", 79.8769, 6.3450),
    ("cifar100", 400): ("eb3114d9593c600be4d56ffe2aa38032e11f367f", 76.8099, 6.4712),
    ("cifar100", 500): ("22c3952c01fbd7f2fc6f9344a93e568633b0befa", 74.2617, 6.6023),
    ("cifar10", 100): ("d6a91228ee264d98002c435b4b44f7d85b055043", 84.1602, 5.9658),
    ("cifar10", 200): ("c3a66198830df64c3c7303993b0324a57d627163", 85.6623, 6.2433),
    ("cifar10", 300): ("e695e0e714b030efea1c6c010ac1f98b54f46ab8", 68.5474, 6.4890),
    ("cifar10", 400): ("56094cef7cbf73798d48f711bc2b7df33bcfb085", 62.5378, 6.6582),
    ("cifar10", 500): ("a1e5703c9c3fa7a3a7b0498b6ff1389cdb6bde93", 64.1621, 6.6900),
}
AUTHORS_METRIC = ("the authors' own: 5,000 samples against the 10,000 test images, torchvision's ImageNet "
                  "Inception v3 (oil FID_and_IS); not the standard 50k TF-Inception FID")
MAX_DOWNLOAD = 64 << 20  # bytes; the files are about 16 MB
TIMEOUT_S = 60


def blob_id(path: str | Path) -> str:
    """The git blob id of a file (SHA-1 of ``b"blob <size>\\0"`` + its bytes), as ``git hash-object`` prints it."""
    path = Path(path)
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def checkpoint_path(dataset: str, epoch: int) -> str:
    return f"{RUNS[dataset]}/{dataset}_generator_{epoch}.ckpt"


def checkpoint_url(dataset: str, epoch: int) -> str:
    return f"{URL_BASE}/{COMMIT}/{checkpoint_path(dataset, epoch)}"


def _authors_file(blob: str) -> tuple[str, int] | None:
    """The (dataset, epoch) of the authors' checkpoint with this blob id, if it is one."""
    return next((key for key, (b, _, _) in CHECKPOINTS.items() if b == blob), None)


@dataclass
class ImportConfig:
    """python -m kd.synthetic import: the authors' SN-GAN weights (or another oil checkpoint) as a generator."""

    source: str = setting("gnosis", "gnosis: one of the authors' checkpoints (downloaded from their repository at "
                                    "the pinned commit, or --file; verified by its git blob id) | oil: another "
                                    "checkpoint of olive-oil-ml's resnetgan.Generator(z_dim=128, k=256) (--file; "
                                    "published unverified as generator-{dataset}-oil-{sha8})",
                          choices=("gnosis", "oil"))
    dataset: str = setting("cifar100", "the dataset the generator was trained on", choices=("cifar10", "cifar100"))
    epoch: int = setting(0, "the authors' checkpoint after this many epochs; 0: 500, the one Figure 1 sampled",
                         choices=(0, *EPOCHS))
    upsample: str = setting("nearest", "G's x2 upsampling when sampled: nearest (as the authors trained it) or "
                                       "bilinear (olive-oil-ml's from 2020-12-23 on); the weights fit both",
                            choices=("nearest", "bilinear"))
    file: str = setting("", "a copy of the checkpoint on disk (no download)", identity=False)
    out: str = setting("", "the import's run folder; empty: runs/{artifact name}", identity=False)
    store: str = setting("", "local artifact store; empty: $KD_STORE, else ./artifacts", identity=False)
    project: str = setting(names.PROJECT, "W&B project", name=True, identity=False)
    resume: str = setting("auto", "auto: an import that finished is not done again | False: import again",
                          choices=("auto", "True", "False"), identity=False)

    kind = "generator"
    # what the run lifecycle (kd.session) reads that an import does not set
    study: ClassVar[str] = "default"
    mixed_precision: ClassVar[str] = "no"
    cpu: ClassVar[bool] = True
    run_seed: ClassVar[int] = 0
    out_flag: ClassVar[str] = "--out"

    def file_sha256(self) -> str:
        return sha256_file(Path(self.file).expanduser()) if self.file else ""

    def run_name(self) -> str:
        return self.artifact_name(self.file_sha256() if self.source == "oil" else "")

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.run_name()}")

    def identity(self) -> dict:
        """What the generator depends on: the authors' file of (dataset, epoch), or another file's sha256; the
        upsampling."""
        return {**identity(self), "epoch": self.epoch_or_default(),
                **({"sha256": self.file_sha256()} if self.source == "oil" else {})}

    def validate(self) -> None:
        check_fields(self)
        if self.source == "oil" and not self.file:
            raise KDError("--source=oil imports a checkpoint of your own, which has no download: pass --file=PATH")
        if self.source == "oil" and self.epoch:
            raise KDError(f"--epoch={self.epoch} picks one of the authors' checkpoints (--source=gnosis); an "
                          "--source=oil file has none: drop --epoch")
        if self.file and not Path(self.file).expanduser().is_file():
            raise KDError(f"--file={self.file}: no such file")

    def epoch_or_default(self) -> int:
        return self.epoch or DEFAULT_EPOCH

    def artifact_name(self, sha256: str = "") -> str:
        mode = "-bilinear" if self.upsample == "bilinear" else ""
        if self.source == "oil":
            return f"generator-{self.dataset}-oil-{sha256[:8]}{mode}"
        return f"generator-{self.dataset}-gnosis-e{self.epoch_or_default()}{mode}"


def _download(url: str, dest: Path) -> None:
    """``url`` into ``dest`` with a progress bar; every failure is one KDError that names ``--file``."""
    import http.client
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    fix = "without network, fetch that URL on a machine that has it and pass the file with --file=PATH"
    got = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(dest, "wb") as fh:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > MAX_DOWNLOAD:
                raise KDError(f"{url} is {total} bytes, not a generator checkpoint (about 16 MB): check the URL")
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}",
                      dynamic_ncols=True) as bar:
                while block := resp.read(1 << 20):
                    got += len(block)
                    if got > MAX_DOWNLOAD:
                        raise KDError(f"{url} sends more than {MAX_DOWNLOAD >> 20} MiB, not a generator checkpoint")
                    fh.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        raise KDError(f"cannot download {url} (HTTP {e.code} {e.reason}); {fix}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        why = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
        raise KDError(f"cannot download {url} ({type(e).__name__}: {first_line(why, 160)}); {fix}") from None
    if total is not None and got != total:
        raise KDError(f"the download of {url} was cut off ({got} of {total} bytes): run the import again; {fix}")


def _verify(cfg: ImportConfig, path: str, blob: str) -> None:
    """An import that claims one of the authors' files must be that file (its blob id); an ``oil`` import of
    one of them is pointed at ``--source=gnosis``. ``path`` names the file in the messages."""
    found = _authors_file(blob)
    if cfg.source == "oil":
        if found:
            raise KDError(f"{path} is the authors' {found[0]} epoch-{found[1]} checkpoint (git blob {blob}): import "
                          f"it verified with --source=gnosis --dataset={found[0]} --epoch={found[1]}")
        return
    want = CHECKPOINTS[(cfg.dataset, cfg.epoch_or_default())][0]
    if blob == want:
        return
    if found:
        raise KDError(f"{path} is the authors' {found[0]} epoch-{found[1]} checkpoint, not {cfg.dataset} epoch "
                      f"{cfg.epoch_or_default()}: pass --dataset={found[0]} --epoch={found[1]}")
    raise KDError(f"{path} is not the authors' {Path(checkpoint_path(cfg.dataset, cfg.epoch_or_default())).name}: "
                  f"its git blob id is {blob}, not {want} (a truncated, damaged or other file); download it again, "
                  "or import a checkpoint of your own with --source=oil")


def _provenance(cfg: ImportConfig, path: Path, blob: str, sha: str, fmt: str) -> dict:
    meta = {"generator": "sngan", "source": cfg.source, "dataset": cfg.dataset, "sample_size": 32,
            "upsample": cfg.upsample, "blob_id": blob, "source_sha256": sha, "source_bytes": path.stat().st_size,
            "source_format": fmt, "verified": cfg.source == "gnosis"}
    if cfg.source == "oil":
        return {**meta, "recipe": "unknown", "trained_upsample": "unknown"}
    epoch = cfg.epoch_or_default()
    _, fid, inception = CHECKPOINTS[(cfg.dataset, epoch)]
    return {**meta, "recipe": "gnosis-fig1", "trained_upsample": "nearest", "epoch": epoch,
            "step": epoch * FIG1_EPOCH_STEPS, "url": checkpoint_url(cfg.dataset, epoch), "commit": COMMIT,
            "path": checkpoint_path(cfg.dataset, epoch), "authors_fid": fid, "authors_is": inception,
            "authors_metric": AUTHORS_METRIC}


def import_generator(cfg: ImportConfig) -> Path:
    """Import the checkpoint ``cfg`` names (see the module docstring); returns its version folder in the store."""
    cfg.validate()
    session = Session(cfg, job="import-generator")  # the outputs checked, before any download
    if session.already_finished():
        return Path(session.folder.done_info()["store_path"])
    tmp = Path(tempfile.mkdtemp(prefix="kd-import-"))
    try:
        if cfg.file:
            path = Path(cfg.file).expanduser()
            label = str(path)
        else:
            url = checkpoint_url(cfg.dataset, cfg.epoch_or_default())
            path, label = tmp / Path(url).name, f"the file downloaded from {url}"
            _download(url, path)
        return _import_file(cfg, session, path, tmp, label)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _import_file(cfg: ImportConfig, session: Session, path: Path, tmp: Path, label: str) -> Path:
    blob, sha = blob_id(path), sha256_file(path)
    _verify(cfg, label, blob)
    name = cfg.artifact_name(sha)
    state, fmt = oil.read_state_dict(path)
    g = oil.to_generator(state, cfg.upsample, path)
    meta = _provenance(cfg, path, blob, sha, fmt)
    preset = replace(GAN_PRESETS["gnosis-fig1"], upsample=cfg.upsample)
    files = sngan.save_generator(tmp / "generator", g, preset, meta)
    meta = {**meta, "params": sum(p.numel() for p in g.parameters()), "weights_sha256": sha256_file(files[0])}
    said = "verified: the authors' file" if meta["verified"] else "unverified: not one of the authors' files"
    print(f"{path.name}: git blob {blob}, sha256 {sha[:12]}..., {fmt} ({said}) -> {name}", file=sys.stderr)
    with session.tracked():
        session.start_tracking(meta, tags=["import-generator", cfg.dataset])
        where = session.publish(name, "model", files, meta)
        session.finish({"blob_id": blob, "verified": meta["verified"], names.FINAL: True})
    print(f"artifact {name} ({where.name}) in {where.parent}: generate with --model={name}", file=sys.stderr)
    return where
