"""Checkpoints by reference: a local path, or a Hugging Face Hub repository (``owner/name``), optionally pinned
(``owner/name@revision``) and with a file or folder inside it (``h94/IP-Adapter/sdxl_models/image_encoder``).

A local path that exists always wins; anything else shaped like ``owner/name[@revision][/path]`` is looked up on the
hub (``HF_ENDPOINT``, default https://huggingface.co) and downloaded with ``huggingface_hub`` into the Hugging Face
cache layout under ``cache_dir`` (``models--owner--name/{blobs,refs,snapshots}``). Only the files our loaders read
are fetched: for a diffusers pipeline ``model_index.json``, the configs, tokenizers and scheduler, and one set of
weights per component (safetensors; the ``fp16`` variant when the run is fp16 and the repository has it; ``.bin`` only
where no safetensors exist); for a component folder its configs and one set of weights; for a file, the file.

The cache is read first, without any request: what is there is used when it holds everything the loader reads
(huggingface_hub moves a file into a snapshot only once it is complete, so a cut-short download is never mistaken
for a finished one, and the next run resumes it from its ``.incomplete`` blob). ``local_files_only`` or
``HF_HUB_OFFLINE=1`` stop there; ``HF_TOKEN`` is the token for gated and private repositories.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_REFERENCE = re.compile(rf"(?P<repo>{_REPO})(?:@(?P<revision>[^/@]+))?(?:/(?P<path>[^@]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHARD = r"-\d{5}-of-\d{5}"
PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


class HubError(FileNotFoundError):
    """A checkpoint that could not be had: the message names the repository, the file and what to do."""


@dataclass(frozen=True)
class HubReference:
    repo_id: str
    revision: str | None = None
    path: str = ""  # a file or folder inside the repository; "" is the whole repository

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f"/{self.path}" if self.path else "")


def parse_reference(reference: str | os.PathLike) -> HubReference | None:
    """The hub reference that ``reference`` names, or None when it is (or can only be) a local path: it exists, or
    it is absolute, starts with ``.`` or ``~``, or is not shaped like ``owner/name[@revision][/path]``."""
    text = str(reference)
    if Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or "\\" in text or text.endswith("/"):
        return None
    match = _REFERENCE.fullmatch(text)
    if not match or "--" in match["repo"] or ".." in text:
        return None
    return HubReference(match["repo"], match["revision"], match["path"] or "")


def endpoint() -> str:
    """``HF_ENDPOINT`` read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in ("1", "ON", "YES")


def resolve(
    reference: str | os.PathLike,
    cache_dir: str | os.PathLike,
    revision: str | None = None,
    local_files_only: bool = False,
    fp16: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The local file or folder for ``reference``: the path itself if it exists, else the hub files, from the cache
    or downloaded. ``revision`` pins a branch, tag or commit (or write ``owner/name@revision``); ``fp16`` prefers
    the fp16 weight variant; ``progress`` receives one line before a download starts."""
    ref = parse_reference(reference)
    if ref is None:
        path = Path(reference).expanduser()
        if not path.exists():
            raise HubError(f"{reference} does not exist (and is not a hub reference owner/name[@revision][/path])")
        return path
    if revision and ref.revision and revision != ref.revision:
        raise ValueError(f"{reference}: two revisions given ({ref.revision!r} in the reference and {revision!r})")
    ref = HubReference(ref.repo_id, ref.revision or revision, ref.path)
    cache_dir = Path(cache_dir)
    cached = _cached(ref, cache_dir)
    if cached is not None:
        return cached
    if local_files_only or offline():
        why = "local files only" if local_files_only else "HF_HUB_OFFLINE is set"
        raise HubError(
            f"{ref}: not (completely) in the cache {cache_dir} and downloads are off ({why}); download it once with "
            "network access, or point the cache at a folder that holds it"
        )
    return _download(ref, cache_dir, fp16, progress)


# ---- the cache --------------------------------------------------------------------------------------------------


def _storage(repo_id: str, cache_dir: Path) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def _cached(ref: HubReference, cache_dir: Path) -> Path | None:
    """The snapshot path of ``ref`` if the cache holds everything the loader reads from it; no request."""
    storage, revision = _storage(ref.repo_id, cache_dir), ref.revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else None
    if commit is None and (storage / "refs" / revision).is_file():
        commit = (storage / "refs" / revision).read_text().strip()
    if commit is None:
        return None
    target = storage / "snapshots" / commit / ref.path
    return target if target.is_file() or (target.is_dir() and not missing_files(target)) else None


def missing_files(folder: Path) -> list[str]:
    """What the loader needs from ``folder`` (a diffusers pipeline if it has ``model_index.json``, else one
    component folder) and does not find there; [] when complete."""
    if (folder / "model_index.json").is_file():
        need = [f"{f}/config.json" for f in _WEIGHT_FOLDERS] + ["scheduler/scheduler_config.json"]
        need += [f"{t}/{n}" for t in ("tokenizer", "tokenizer_2") for n in ("vocab.json", "merges.txt")]
        missing = [n for n in need if not (folder / n).is_file()]
        return missing + [m for f in _WEIGHT_FOLDERS for m in _missing_weights(folder / f, f)]
    return [n for n in ["config.json"] if not (folder / n).is_file()] + _missing_weights(folder, folder.name)


def _missing_weights(folder: Path, label: str) -> list[str]:
    from .weights.layouts import weight_names

    for kind in ("diffusers", "transformers"):
        for name in weight_names(kind):
            if (folder / name).is_file():
                if ".index" not in name:
                    return []
                import json

                shards = set(json.loads((folder / name).read_text()).get("weight_map", {}).values())
                return [f"{label}/{s}" for s in sorted(shards) if not (folder / s).is_file()]
    return [f"{label}/<weights>"]


# ---- choosing files ---------------------------------------------------------------------------------------------


def select_files(files: Iterable[str], path: str = "", fp16: bool = False) -> list[str]:
    """The files of a repository listing that the loaders read for ``path`` (see the module docstring)."""
    files = sorted(files)
    if path in files:
        return [path]
    prefix = f"{path.rstrip('/')}/" if path else ""
    if prefix + "model_index.json" in files:
        chosen = [prefix + "model_index.json"]
        for folder in PIPELINE_FOLDERS:
            chosen += _select_folder(files, prefix + folder + "/", fp16)
        return sorted(chosen)
    return _select_folder(files, prefix, fp16)


def _select_folder(files: list[str], prefix: str, fp16: bool) -> list[str]:
    """Configs and tokenizer files (.json, .txt) directly in the folder, and one set of weights."""
    from .weights.layouts import weight_names

    names = [f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]]
    variants = ("fp16", None) if fp16 else (None, "fp16")
    indexes = {n for kind in ("diffusers", "transformers") for n in weight_names(kind) if ".index" in n}
    chosen = [n for n in names if n.endswith((".json", ".txt")) and n not in indexes]
    for kind in ("diffusers", "transformers"):
        weights = next((n for n in weight_names(kind, variants) if n in names), None)
        if weights is None:
            continue
        if ".index" in weights:  # the shards of model.safetensors.index[.fp16].json: model[.fp16]-00001-of-0000N.*
            variant = weights.split(".index")[1].removesuffix(".json")
            stem, ext = weights.split(".")[0], weights.split(".")[1]
            shard = re.compile(re.escape(stem + variant) + _SHARD + re.escape("." + ext))
            chosen += [n for n in names if shard.fullmatch(n)]
        chosen.append(weights)
        break
    return sorted(prefix + n for n in chosen)


# ---- downloading ------------------------------------------------------------------------------------------------


def _free_bytes(folder: Path) -> int:
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _download(ref: HubReference, cache_dir: Path, fp16: bool, progress: Callable[[str], None] | None) -> Path:
    import requests
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as E

    url, revision = endpoint(), ref.revision or "main"
    what = f"{ref.repo_id}" + (f" (revision {ref.revision})" if ref.revision else "")
    files, need = [], 0
    try:
        info = HfApi(endpoint=url).model_info(ref.repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        files = select_files(sizes, ref.path, fp16)
        if not files or (ref.path and not any(f == ref.path or f.startswith(ref.path + "/") for f in files)):
            raise HubError(f"{what}: no file or folder {ref.path or 'with weights'} in it; check the path")
        snapshot = _storage(ref.repo_id, cache_dir) / "snapshots" / str(info.sha)
        todo = [f for f in files if not (snapshot / f).is_file()]
        need = sum(sizes[f] for f in todo)
        if need > _free_bytes(cache_dir):
            raise OSError(errno.ENOSPC, "not enough free space")
        if progress:
            progress(f"downloading {len(todo)} files ({need / 1e9:.2f} GB) of {what} from {url} into {cache_dir}")
        escaped = [re.sub(r"([\[\]*?])", r"[\1]", f) for f in files]  # allow_patterns are fnmatch patterns
        folder = snapshot_download(
            ref.repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=escaped, endpoint=url
        )
    except HubError:
        raise
    except E.GatedRepoError:
        raise HubError(
            f"{what} is gated: accept its conditions at {url}/{ref.repo_id} and set HF_TOKEN to a token of that account"
        ) from None
    except E.RepositoryNotFoundError:
        raise HubError(
            f"{what}: no such repository on {url} (for a private one set HF_TOKEN); check the name"
            + (f", or the local path {ref} if one was meant" if ref.path else "")
        ) from None
    except E.RevisionNotFoundError:
        raise HubError(f"{ref.repo_id}: no revision {revision!r} on {url}; check the branch, tag or commit") from None
    except E.EntryNotFoundError as err:
        raise HubError(f"{what}: a file is missing on {url} ({_url_of(err)}); check the path or revision") from None
    except E.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = "set HF_TOKEN to a token with access" if status in (401, 403) else "try again later"
        raise HubError(f"{what}: {url} answered HTTP {status} for {_url_of(err)}; {hint}") from None
    except (requests.ConnectionError, requests.Timeout, E.LocalEntryNotFoundError) as err:
        done = _progress_note(ref, cache_dir, files)
        raise HubError(
            f"{what}: the download from {url} failed ({type(err).__name__}){done}; check the network (or HF_ENDPOINT "
            "for a mirror) and run again: finished files are kept and a cut-short one resumes"
        ) from None
    except requests.RequestException as err:  # e.g. ChunkedEncodingError: the connection dropped mid-file
        done = _progress_note(ref, cache_dir, files)
        raise HubError(
            f"{what}: the download was cut short ({type(err).__name__}){done}; run again to resume it"
        ) from None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise HubError(
            f"{what}: no space left in {cache_dir} ({need / 1e9:.2f} GB to download, {_free_bytes(cache_dir) / 1e9:.2f}"
            " GB free); free some space or choose another cache directory"
        ) from None
    target = Path(folder) / ref.path
    missing = [f for f in files if not (Path(folder) / f).is_file()]
    if missing:
        raise HubError(f"{what}: {len(missing)} files did not arrive ({', '.join(missing[:3])}); run again to resume")
    return target


def _url_of(err: Exception) -> str:
    response = getattr(err, "response", None)
    return response.url if response is not None else str(err).splitlines()[0]


def _progress_note(ref: HubReference, cache_dir: Path, files: list[str]) -> str:
    """Which of the chosen files are still missing, for the message of a failed download."""
    storage = _storage(ref.repo_id, cache_dir) / "snapshots"
    if not files:
        return ""
    have = {f for snap in storage.glob("*") for f in files if (snap / f).is_file()} if storage.is_dir() else set()
    missing = [f for f in files if f not in have]
    return f"; missing {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
