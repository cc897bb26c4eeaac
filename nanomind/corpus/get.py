"""`nanomind data get`: download a dataset file, resuming partial downloads, checking its sha256.

    nanomind data get minimind/pretrain_hq.jsonl --out data/raw
    HF_ENDPOINT=https://hf-mirror.com nanomind data get minimind/sft_mini_512.jsonl --out data/raw
    nanomind data get minimind/dpo.jsonl --hub modelscope --out data/raw
    nanomind data get https://example.org/corpus.parquet --out data/raw --sha256 <hex>

Bytes go to OUT/FILE.part; an interrupted download (network error, Ctrl-C) continues from where it stopped with
an HTTP Range request, on the next attempt or the next run. Only a file whose size and sha256 check out is renamed
to OUT/FILE; a wrong checksum deletes the partial file. The expected sha256 is --sha256, or the Hugging Face Hub's
own (the `X-Linked-Etag` of a file stored with LFS is its sha256), else the file is not checked.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from tqdm import tqdm

from nanomind.config import arg, parse
from nanomind.jsonl import sha256 as file_sha256

# The files of minimind's dataset repository (jingyaogong/minimind_dataset on the Hub, gongjy/minimind_dataset
# on ModelScope); any other file name in that repository works too.
MINIMIND_FILES = (
    "pretrain_hq.jsonl", "sft_mini_512.jsonl", "sft_512.jsonl", "sft_1024.jsonl", "sft_2048.jsonl", "dpo.jsonl",
    "r1_mix_1024.jsonl", "lora_identity.jsonl", "lora_medical.jsonl",
)  # fmt: skip
MINIMIND_REPO = {"hf": "jingyaogong/minimind_dataset", "modelscope": "gongjy/minimind_dataset"}
CHUNK = 1 << 16


@dataclass
class GetConfig:
    name: str = arg(
        help="minimind/FILE, hf:OWNER/REPO/PATH, modelscope:OWNER/REPO/PATH or an http(s) URL "
        f"(also the first positional argument); minimind files: {', '.join(MINIMIND_FILES)}"
    )
    out: str = arg("data", "directory to save the file into")
    hub: str = arg("hf", "hub of minimind/FILE names: hf (honours HF_ENDPOINT) or modelscope (MODELSCOPE_DOMAIN)",
                   choices=["hf", "modelscope"])  # fmt: skip
    revision: str = arg("", "branch, tag or commit on the hub (empty: main on hf, master on modelscope)")
    sha256: str = arg("", "expected sha256 of the file (empty: the hub's when it gives one, else unchecked)")
    retries: int = arg(3, "attempts after the first; each resumes where the last stopped")
    timeout: float = arg(30.0, "seconds without data before an attempt fails")

    def __post_init__(self) -> None:
        self.sha256 = self.sha256.lower()
        if self.sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"--sha256 must be 64 hex digits, got {self.sha256!r}")
        if self.retries < 0 or self.timeout <= 0:
            raise ValueError(f"need --retries >= 0 and --timeout > 0, got {self.retries} and {self.timeout}")


def hub_url(hub: str, repo: str, path: str, revision: str = "") -> str:
    """The download URL of a dataset file on the Hugging Face Hub or ModelScope, honouring mirror variables."""
    if hub == "hf":
        base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{base}/datasets/{repo}/resolve/{quote(revision or 'main', safe='')}/{quote(path)}"
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn").rstrip("/")
    base = domain if "://" in domain else f"https://{domain}"
    return f"{base}/datasets/{repo}/resolve/{quote(revision or 'master', safe='')}/{quote(path)}"


def resolve(name: str, hub: str = "hf", revision: str = "") -> tuple[str, str, str]:
    """(url, file name, hub or "") for a dataset name or URL."""
    if re.match(r"https?://", name):
        filename = Path(urlsplit(name).path).name
        if not filename:
            raise ValueError(f"{name}: the URL names no file")
        return name, filename, ""
    prefix, _, rest = name.partition(":")
    if prefix in ("hf", "modelscope") and rest.count("/") >= 2:
        owner, repo, path = rest.split("/", 2)
        return hub_url(prefix, f"{owner}/{repo}", path, revision), Path(path).name, prefix
    if name.startswith("minimind/") and name.count("/") == 1:
        filename = name.split("/", 1)[1]
        return hub_url(hub, MINIMIND_REPO[hub], filename, revision), filename, hub
    raise ValueError(
        f"unknown dataset {name!r}: give minimind/FILE ({', '.join(MINIMIND_FILES)}), "
        "hf:OWNER/REPO/PATH, modelscope:OWNER/REPO/PATH or an http(s) URL"
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


def hub_sha256(url: str, timeout: float = 30.0) -> str:
    """The sha256 the Hugging Face Hub reports for an LFS file (its X-Linked-Etag), or "" when it gives none.
    The header is on the Hub's own answer, not on the CDN it redirects to, so redirects are not followed."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "nanomind"})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as e:  # the 302 to the CDN lands here
        headers = e.headers
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return ""
    tag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"').lower()
    return tag if re.fullmatch(r"[0-9a-f]{64}", tag) else ""


class _Incomplete(Exception):
    pass


def _fetch(url: str, part: Path, timeout: float) -> None:
    """One attempt: append the rest of the file to `part` (or start over when the server cannot resume)."""
    have = part.stat().st_size if part.exists() else 0
    tag_file = part.with_name(part.name + ".etag")
    headers = {"User-Agent": "nanomind", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if tag_file.exists():  # If-Range: the server sends the whole file instead if it changed since
            headers["If-Range"] = tag_file.read_text()
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is whole; the size check below decides
            return
        raise
    with resp:
        content_range = resp.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range)
        if resp.status == 206 and match and int(match[1]) == have:
            total = None if match[2] == "*" else int(match[2])
        else:  # a 200 (no Range support, or the file changed): start over
            have, length = 0, resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            if validator:
                tag_file.write_text(validator)
            else:
                tag_file.unlink(missing_ok=True)
        mode = "ab" if have else "wb"
        with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True, disable=None) as bar:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:  # urllib returns a short body silently when a connection drops
        raise _Incomplete(f"connection closed after {size} of {total} bytes")


def download(url: str, dest: Path, sha256: str = "", retries: int = 3, timeout: float = 30.0, wait: float = 1.0):
    """Download `url` to `dest` through `dest.part`, resuming, then check the sha256 (when given) and rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        actual = file_sha256(dest) if sha256 else ""
        if actual != sha256:
            raise ValueError(f"{dest} exists with sha256 {actual}, not the expected {sha256}; delete it to fetch again")
        print(f"{dest} is already here" + (" (sha256 ok)" if sha256 else ""))
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:  # not found, forbidden, ...: retrying will not help
                raise ValueError(f"{url}: HTTP {e.code} {e.reason}") from None
            error: Exception = e
        except (urllib.error.URLError, OSError, http.client.HTTPException, _Incomplete) as e:
            error = e
        have = part.stat().st_size if part.exists() else 0
        if attempt == retries:
            raise ValueError(
                f"{url}: download failed after {retries + 1} attempt(s): {error}; {part} keeps {have} bytes, "
                "run the command again to resume"
            )
        print(f"attempt {attempt + 1} failed ({error}); resuming from byte {have}")
        time.sleep(wait * 2**attempt)
    actual = file_sha256(part)
    if sha256 and actual != sha256:
        part.unlink()
        part.with_name(part.name + ".etag").unlink(missing_ok=True)
        raise ValueError(f"{url}: sha256 {actual} is not the expected {sha256}; deleted the download")
    part.replace(dest)
    part.with_name(part.name + ".etag").unlink(missing_ok=True)
    print(f"saved {dest} ({dest.stat().st_size} bytes, sha256 {actual})")
    return dest


def get(cfg: GetConfig) -> Path:
    url, filename, hub = resolve(cfg.name, cfg.hub, cfg.revision)
    expected = cfg.sha256 or (hub_sha256(url, cfg.timeout) if hub == "hf" else "")
    print(f"fetching {url}" + (f" (expecting sha256 {expected})" if expected else ""))
    return download(url, Path(cfg.out) / filename, expected, cfg.retries, cfg.timeout)


def main(argv: list[str] | None = None) -> None:
    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):  # `data get NAME ...`: the config-derived parser knows flags only
        argv = ["--name", *argv]
    get(parse(GetConfig, argv, "nanomind data get", "Download a dataset file with resume and checksum."))
