"""olive-oil-ml's SN-GAN generator checkpoints, read without running any code, as the repository's Generator.

The authors of Stanton et al. 2021 trained ``oil.architectures.img_gen.resnetgan.Generator(z_dim=128, k=256)``
(mfinzi/olive-oil-ml) and saved ``generator.state_dict()`` through their logger (samuelstanton/upcycle
``save_obj``: ``pickle.dump``, read back with ``pickle.load``). Such a file is a plain pickle, not a
``torch.save`` archive, so ``torch.load`` cannot open it at all (it looks for torch's magic number first), and
``pickle.load`` would run whatever code the file names. :func:`read_state_dict` unpickles it with an unpickler
that knows three callables only: ``collections.OrderedDict``; the tensor rebuild (``torch._utils
._rebuild_tensor_v2``, as torch's weights-only loader allows it), here checked and without hooks; and the
storage loader (``torch.storage._load_from_bytes``), replaced by ``torch.load(..., weights_only=True,
map_location="cpu")`` of its bytes (a storage saved on a GPU is read on the CPU). Any other name in the file is
refused before anything is called. A ``torch.save`` archive of the same state dict is read by
``torch.load(..., weights_only=True)``.

The state dict's keys are those of oil's modules: ``model`` is ``Sequential(Linear, view, 3 x ResBlockGenerator,
BatchNorm2d, ReLU, Conv2d, Tanh)`` and each block's ``model`` is ``Sequential(BN, ReLU, Upsample, Conv3x3, BN,
ReLU, Conv3x3)`` (its ``upsample`` and empty ``bypass`` hold no tensors). :func:`to_generator` checks keys, shapes,
kinds and finiteness, and maps them onto :class:`kd.generators.sngan.Generator` (arch ``gnosis``): ``model.0`` ->
``l1``, ``model.{2+i}.model.{0,3,4,6}`` -> ``blocks.{i}.{b1,c1,b2,c2}``, ``model.5`` -> ``b_out``, ``model.7`` ->
``c_out``.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from kd.errors import KDError, first_line
from kd.generators.sngan import Generator, GeneratorShape

MAX_BYTES = 256 << 20  # a CIFAR generator is about 16 MB; a larger file is refused before it is read
N_BLOCKS = 3
OIL_GENERATOR = "olive-oil-ml's resnetgan.Generator(z_dim=128, k=256)"


class Refused(pickle.UnpicklingError):
    """The file names something other than a state dict's plain parts (code, or objects of other kinds)."""


def _storage_from_bytes(data):
    """A storage pickled inside the file (its own small torch file), read weights-only onto the CPU."""
    if not isinstance(data, bytes):
        raise Refused(f"a storage made of {type(data).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pickle protocol note of torch's weights-only unpickler
        try:
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise Refused(f"a storage carrying other objects ({first_line(e, 120)})") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise Refused(f"a storage that is a {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *metadata):
    """A tensor view of ``storage`` (torch's own rebuild, without the hooks a pickle could attach)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise Refused(f"a tensor over a {type(storage).__name__}")
    if hooks:
        raise Refused("a tensor with backward hooks")
    try:
        return torch._utils._rebuild_tensor(storage, offset, tuple(size), tuple(stride))
    except (RuntimeError, TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"a tensor outside its storage ({first_line(e, 120)})") from None


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch.storage", "_load_from_bytes"): _storage_from_bytes}


class _StateDictUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise Refused(f"the global {module}.{name}") from None

    def persistent_load(self, pid):
        raise Refused("a persistent id")


def _refused(path: Path, what: str) -> KDError:
    return KDError(f"{path} holds {what}, which a generator's state dict never does: refused without running it "
                   "(only plain tensors are read); use the checkpoint as its authors saved it")


def _unreadable(path: Path, why: str) -> KDError:
    return KDError(f"{path} cannot be read as a state dict ({why}): the file is truncated or not a checkpoint; "
                   "download or copy it again")


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the refused global (wording varies)
        what = f": the global {named.group(1)}" if named else ""
        raise _refused(path, f"objects torch's weights-only loader refuses{what}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise _unreadable(path, f"{type(e).__name__}: {first_line(e, 160)}") from None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a generator checkpoint and its format ("pickle" or "torch.save"); nothing in the file is
    run. A KDError (one line) for a file that names code or other objects, is cut off, or holds no state dict."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise KDError(f"{path} is {size / 2**20:.0f} MiB, far more than a generator's state dict: pass the "
                      "generator's checkpoint")
    if zipfile.is_zipfile(path):
        obj, fmt = _torch_load(path), "torch.save"
    else:
        try:
            obj, fmt = _StateDictUnpickler(io.BytesIO(path.read_bytes())).load(), "pickle"
        except Refused as e:
            raise _refused(path, str(e)) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                RuntimeError, MemoryError, OverflowError) as e:
            raise _unreadable(path, f"{type(e).__name__}: {first_line(e, 160)}") from None
        if isinstance(obj, int) and not isinstance(obj, bool) and obj == torch.serialization.MAGIC_NUMBER:
            obj, fmt = _torch_load(path), "torch.save"  # torch's legacy (pre-1.6) format
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise KDError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors: pass "
                      f"the state dict of {OIL_GENERATOR}")
    return dict(obj), fmt


def oil_names(n_blocks: int = N_BLOCKS) -> dict[str, str]:
    """Our module prefix -> oil's (``l1`` -> ``model.0``, ``blocks.0.c1`` -> ``model.2.model.3``, ...)."""
    names = {"l1": "model.0", "b_out": f"model.{n_blocks + 2}", "c_out": f"model.{n_blocks + 4}"}
    for i in range(n_blocks):
        for ours, theirs in (("b1", 0), ("c1", 3), ("b2", 4), ("c2", 6)):
            names[f"blocks.{i}.{ours}"] = f"model.{i + 2}.model.{theirs}"
    return names


def oil_key(key: str) -> str:
    """Our state-dict key -> oil's (``blocks.1.b2.running_var`` -> ``model.3.model.4.running_var``)."""
    prefix, leaf = key.rsplit(".", 1)
    return f"{oil_names()[prefix]}.{leaf}"


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _check(path: Path, state: dict, want: dict[str, torch.Tensor]) -> None:
    """The keys, shapes, kinds (floating or integer) and finiteness of ``state`` against oil's layout."""
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        parts = ([f"missing {_listed(missing)}"] if missing else []) + ([f"unexpected {_listed(extra)}"]
                                                                         if extra else [])
        raise KDError(f"{path} is not a state dict of {OIL_GENERATOR} ({'; '.join(parts)}): pass such a "
                      "checkpoint (the authors' cifar*_generator_*.ckpt files are)")
    for key, ref in want.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise KDError(f"{path}: {key} has shape {list(t.shape)}, not {list(ref.shape)} as in {OIL_GENERATOR} "
                          "(a generator of another size?): pass a checkpoint of that generator")
        if t.is_floating_point() != ref.is_floating_point() or t.is_complex():
            raise KDError(f"{path}: {key} holds {t.dtype}, not {ref.dtype}: pass a checkpoint of {OIL_GENERATOR}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise KDError(f"{path}: {key} holds NaN or infinite values (a diverged training?): pass another "
                          "checkpoint")


def to_generator(state: dict[str, torch.Tensor], upsample: str, path: str | Path = "checkpoint") -> Generator:
    """The repository's SN-GAN Generator (arch gnosis, ``upsample`` "nearest" or "bilinear") holding the weights
    and BN statistics of an oil state dict, float32, on the CPU, in eval mode."""
    g = Generator(GeneratorShape(z_dim=128, ch=256, image_size=32, out_channels=3, bottom=4), "gnosis", upsample)
    ours = g.state_dict()
    want = {oil_key(k): v for k, v in ours.items()}
    _check(Path(path), state, want)
    g.load_state_dict({k: state[oil_key(k)].to(v.dtype) for k, v in ours.items()}, strict=True)
    return g.eval()
