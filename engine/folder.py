"""A model folder (engine/export.py writes it): manifest, integrity and parts.

Every part must be a relative path inside the folder and listed with its sha256 under `files`;
anything else, or a manifest that does not match this engine (format version, vocabulary),
raises one EngineError whose message says what to do.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch

from engine import export, native
from engine.model import CLSM

log = logging.getLogger("engine.runtime")

# fast: engine/fast.py's parts (issue 12), same tokens as torchscript and eager, decoding with
# engine/native.py's C++ loop where the folder has its weights and the library builds (else with
# the TorchScript loop); fast-bf16: the same with the prior's Bi-LSTM in bfloat16 (reduced
# precision: z moves by ~1e-3, tokens rarely); fast-script: fast with the TorchScript loop always
# (the fallback, kept selectable to compare and test it).
BACKENDS = ("torchscript", "fast", "fast-bf16", "fast-script", "eager")
FAST_PARTS = {"fast": ("fast_latent", "fast_decoder"), "fast-bf16": ("fast_latent_bf16", "fast_decoder"),
              "fast-script": ("fast_latent", "fast_decoder")}
NATIVE_BACKENDS = ("fast", "fast-bf16")


class EngineError(Exception):
    """Bad input to the engine, or a model folder it cannot use."""


def read_manifest(folder: Path) -> dict:
    path = folder / export.MANIFEST
    if not folder.is_dir():
        raise EngineError(f"model folder {folder} does not exist; export one with "
                          f"`python -m engine.export --checkpoint CKPT --out {folder}`")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise EngineError(f"{path} is missing: re-export the model folder") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): re-export the model folder") from e
    if not isinstance(manifest, dict):
        raise EngineError(f"{path} is not a JSON object: re-export the model folder")
    version = manifest.get("format_version")
    if version != export.FORMAT_VERSION:
        raise EngineError(f"{path}: format version {version!r}, this engine reads version "
                          f"{export.FORMAT_VERSION}: re-export with this version's engine.export")
    if manifest.get("vocab") != export.vocabulary():
        raise EngineError(f"{path}: the model was trained for another token vocabulary "
                          f"than engine/tokens.py; use a model trained with this encoding")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("model_args"), dict):
        raise EngineError(f"{path} lacks 'files' or 'model_args': re-export the model folder")
    for name, meta in files.items():
        file = inside_folder(folder, name, path)
        if not isinstance(meta, dict):
            raise EngineError(f"{path}: files[{name!r}] is not an object: re-export the model folder")
        if not file.is_file():
            raise EngineError(f"{file} is missing: re-export the model folder")
        if export.sha256_file(file) != meta.get("sha256"):
            raise EngineError(f"{file} does not match its sha256 in the manifest (corrupt or "
                              f"replaced): re-export the model folder")
    return manifest


def inside_folder(folder: Path, name: object, manifest_path: Path) -> Path:
    """`folder / name`, refused unless it is a relative path that stays inside the folder."""
    bad = not isinstance(name, str) or not name or Path(name).is_absolute()
    if not bad:
        root = folder.resolve()
        file = (root / name).resolve()
        bad = root not in file.parents
    if bad:
        raise EngineError(f"{manifest_path}: {str(name)[:120]!r} is not a file inside the model "
                          f"folder; re-export the model folder")
    return folder / str(name)


def listed_part(folder: Path, manifest: dict, name: str) -> Path:
    """A part the manifest names: inside the folder and listed (so hashed) under `files`."""
    path = folder / export.MANIFEST
    file = inside_folder(folder, name, path)
    if name not in manifest["files"]:
        raise EngineError(f"{path}: part {name[:120]!r} is not listed (with its sha256) under "
                          f"'files'; re-export the model folder")
    return file


def load_parts(folder: Path, manifest: dict, backend: str, device: str):
    parts = manifest.get("parts")
    parts = parts if isinstance(parts, dict) else {}
    keys = FAST_PARTS.get(backend, ("eager",) if backend == "eager" else ("latent", "decoder"))
    # A folder exported before the fast parts existed: compile them here from its eager weights
    # (about a second more start-up; a float16 folder gives float16-rounded weights, so tokens
    # may differ from its float32 torchscript parts). Re-exporting the folder avoids both.
    compile_fast = backend in FAST_PARTS and not all(isinstance(parts.get(k), str) for k in keys)
    if compile_fast:
        log.warning("%s has no %s parts: compiling them from its eager weights (re-export the "
                    "folder to skip this)", folder, backend)
        keys = ("eager",)
    if not all(isinstance(parts.get(k), str) for k in keys):
        raise EngineError(f"{folder / export.MANIFEST} does not name the {backend} parts: "
                          f"re-export the model folder")
    files = {k: listed_part(folder, manifest, parts[k]) for k in keys}  # inside and hashed
    try:
        if backend == "eager" or compile_fast:
            ckpt = torch.load(files["eager"], map_location=device, weights_only=True)
            model = CLSM.from_checkpoint(ckpt).float()
            latent, decoder = (export.script_fast_parts(*export.build_fast_parts(
                model, lstm_bf16=backend == "fast-bf16")) if compile_fast
                else export.build_parts(model))
        else:
            latent = export.load_scripted(files[keys[0]], device)
            latent = native_part(folder, manifest, backend, device, "native_prior", latent) or latent
            decoder = native_part(folder, manifest, backend, device, "native_decoder")
            if decoder is None:
                decoder = export.load_scripted(files[keys[1]], device)
    # torch reports unreadable files through many exception types (the unpickler's own,
    # RuntimeError from the TorchScript loader and load_state_dict, ...).
    except (RuntimeError, OSError, ValueError, KeyError, TypeError, IndexError, EOFError,
            pickle.UnpicklingError) as e:
        first_line = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise EngineError(f"cannot load the {backend} parts of {folder}: {first_line}; "
                          f"re-export the model folder") from e
    if backend not in FAST_PARTS:
        # float16 folders are stored half-size but computed in float32 on every device (the
        # engine's latents are float32; the fast parts are frozen float32, or bfloat16 on
        # purpose in the Bi-LSTM of fast-bf16)
        latent, decoder = latent.float(), decoder.float()
    return latent.to(device), decoder.to(device)


def native_part(folder: Path, manifest: dict, backend: str, device: str, key: str,
                latent: torch.jit.ScriptModule | None = None):
    """The C++ decode loop (key native_decoder) or Bi-LSTM around `latent` (native_prior) for a
    fast backend, or None (another backend or device, a folder exported without the part, no
    compiler): the caller then keeps TorchScript. fast-bf16 keeps its bfloat16 LSTM."""
    name = manifest["parts"].get(key)
    if (backend not in NATIVE_BACKENDS or device != "cpu" or not isinstance(name, str)
            or (key == "native_prior" and backend != "fast")):
        return None
    lib = native.library()
    if lib is None:
        return None
    packed = torch.load(listed_part(folder, manifest, name), map_location="cpu", weights_only=True)
    if not isinstance(packed, dict):
        raise ValueError(f"{name} is not a dict of tensors")
    if key == "native_prior":  # the scripted trunk must export its halves (fast.FastLatent)
        if int(packed.get("config", {}).get("hidden", 0)) % 16:
            return None  # the C++ cell works on whole vectors of 16 units
        if not hasattr(latent, "trunk_rows"):
            raise ValueError("fast_latent.pt predates native_prior.pt (no trunk_rows)")
        return native.NativeLatent(lib, latent, packed)
    return native.NativeDecoder(lib, packed)
