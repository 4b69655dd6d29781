"""Model names as users write them: a local folder, or a Hugging Face Hub id (`microsoft/deberta-v3-small`)
fetched through huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 honoured).
Torch-free. `resolve_pretrained(name)` returns a local folder for `from_pretrained`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vegalm.errors import VegaError

# owner/name or name, as the Hub spells repo ids (letters, digits, '-', '_', '.'; at most one '/')
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# weights in formats vegalm never loads: not downloaded
_IGNORE = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.gguf", "onnx/*", "openvino/*", "rust_model*"]


class HubError(VegaError):
    """A Hub id that cannot be resolved: offline and not cached, unknown, gated, or the Hub unreachable."""


def looks_like_hub_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def resolve_pretrained(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; a Hub id through `huggingface_hub.snapshot_download` (cached copy first when
    HF_HUB_OFFLINE=1). Anything else raises a one-line VegaError."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if os.path.lexists(path):
        raise VegaError(f"{name}: expected a model folder (config.json + weights), found a file")
    if not looks_like_hub_id(name):
        raise VegaError(f"{name}: no such model directory (and not a Hugging Face Hub id such as microsoft/deberta-v3-small)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"the cache {constants.HF_HUB_CACHE}"
    try:
        return Path(snapshot_download(name, revision=revision, ignore_patterns=_IGNORE))
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub is unreachable")
        raise HubError(f"{name}: not a local folder, and not in {where} while {how}; "
                       f"download it where the Hub is reachable (`hf download {name}`) or pass a local folder") from None
    except GatedRepoError:
        raise HubError(f"{name}: a gated Hub model; accept its terms on huggingface.co and log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{name}: the Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{name}: no such local folder, and no such model on the Hugging Face Hub "
                       "(or it is private: log in with `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{name}: could not fetch it from the Hugging Face Hub ({first})") from None
