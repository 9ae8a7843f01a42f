"""Pulling vision models against the hub emulator on loopback: the projector (mmproj*.gguf) or
.rknn encoder comes along, is named in the Modelfile, counts in the progress, is verified like
the model, and a failure in it leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import ollama
import pytest

from conftest import RkllamaServer
from hub_emulator import HubEmulator
from rkllama.store.pull_companions import choose_mmproj, quant_bits
from test_pull import MB, hub_env, percents, pull, snapshot


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with HubEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def srv(hub: HubEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    """A server with no model loaded (these tests only check the store), whose hub is the emulator."""
    root = tmp_path_factory.mktemp("pull-vision")
    models = root / "models"
    models.mkdir()
    server = RkllamaServer(models, root / "server.log", args=["--no-default"], env=hub_env(hub.url, root / "hf-home"))
    yield server.wait_ready(expect_model=False)
    server.stop()


def vision_repo(hub: HubEmulator, repo: str, stem: str) -> dict[str, bytes]:
    """A GGUF model, Q4_K_M, with an F16 and a Q8_0 projector (and a README) in its repo."""
    files = {
        f"{stem}-Q4_K_M.gguf": os.urandom(MB + 17),
        f"mmproj-{stem}-F16.gguf": os.urandom(MB // 2),
        f"mmproj-{stem}-Q8_0.gguf": os.urandom(MB // 4 + 3),
        "README.md": b"# a vision model",
    }
    for path, data in files.items():
        hub.add_file(repo, path, data)
    return files


def modelfile(srv: RkllamaServer, name: str) -> str:
    return (srv.models_dir / name / "Modelfile").read_text()


def listed(srv: RkllamaServer) -> list[str]:
    with srv.client() as client:
        response = client.get("/models")
        assert response.status_code == 200
        return response.json()["models"]


def test_gguf_pull_brings_the_projector_nearest_the_models_precision(hub: HubEmulator, srv: RkllamaServer) -> None:
    files = vision_repo(hub, "test-user/vis", "vis")
    model, chosen, other = "vis-Q4_K_M.gguf", "mmproj-vis-Q8_0.gguf", "mmproj-vis-F16.gguf"

    status, lines, _ = pull(srv, f"hf/test-user/vis/{model}")

    assert status == 200
    total = len(files[model]) + len(files[chosen])
    assert lines[0] == f"Downloading {model} + {chosen} ({total / MB:.2f} MB)..."
    values = percents(lines)
    assert values == sorted(values) and values[-1] == 100 and values.count(100) == 1
    folder = srv.models_dir / "vis-Q4_K_M"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", chosen, model]
    assert (folder / model).read_bytes() == files[model]
    assert (folder / chosen).read_bytes() == files[chosen]
    assert f'MMPROJ="{chosen}"' in modelfile(srv, "vis-Q4_K_M")
    assert hub.downloads("test-user/vis", other) == []
    assert "vis-Q4_K_M" in listed(srv) and not any(name.startswith("mmproj") for name in listed(srv))
    assert not (srv.models_dir / ".pulls").exists()


@pytest.mark.parametrize(
    ("files", "model", "chosen"),
    [
        (["mmproj-F16.gguf", "mmproj-Q8_0.gguf"], "m-Q4_K_M.gguf", "mmproj-Q8_0.gguf"),
        (["mmproj-F16.gguf", "mmproj-Q8_0.gguf"], "m-F16.gguf", "mmproj-F16.gguf"),
        (["mmproj-BF16.gguf", "mmproj-F32.gguf"], "m-Q8_0.gguf", "mmproj-BF16.gguf"),
        (["mmproj-F16.gguf", "Q4/mmproj-F32.gguf"], "Q4/m-Q4_K_M-00001-of-00002.gguf", "Q4/mmproj-F32.gguf"),
        (["other/mmproj-Q4_0.gguf", "mmproj-F16.gguf"], "sub/m-Q4_K_M.gguf", "mmproj-F16.gguf"),
        (["model-projector.gguf", "mmproj-b.gguf", "mmproj-a.gguf"], "m.gguf", "mmproj-a.gguf"),
        (["m-Q8_0.gguf", "README.md"], "m-Q4_K_M.gguf", None),
    ],
)
def test_projector_choice_follows_llama_cpp_hf(files: list[str], model: str, chosen: str | None) -> None:
    # Nearest folder first, then the nearest precision, then the first by path (common/download.cpp).
    assert choose_mmproj(sorted([*files, model]), model) == chosen


def test_quant_bits_read_the_last_tag_of_the_file_name() -> None:
    assert [quant_bits(n) for n in ("x-Q4_K_M.gguf", "x.Q8_0.gguf", "x-BF16.gguf", "x-F16-00002-of-00003.gguf")] == [
        4,
        8,
        16,
        16,
    ]
    assert quant_bits("mmproj-model.gguf") == 0 and quant_bits("model.rkllm") == 0


def test_projector_named_after_plus_is_pulled_instead(hub: HubEmulator, srv: RkllamaServer) -> None:
    files = vision_repo(hub, "test-user/vis-named", "visn")

    status, lines, _ = pull(srv, "hf/test-user/vis-named/visn-Q4_K_M.gguf+mmproj-visn-F16.gguf")

    assert status == 200 and lines[-1] == "100%"
    folder = srv.models_dir / "visn-Q4_K_M"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "mmproj-visn-F16.gguf", "visn-Q4_K_M.gguf"]
    assert (folder / "mmproj-visn-F16.gguf").read_bytes() == files["mmproj-visn-F16.gguf"]
    assert 'MMPROJ="mmproj-visn-F16.gguf"' in modelfile(srv, "visn-Q4_K_M")


def test_plus_none_pulls_the_model_alone_and_a_later_pull_adds_only_the_projector(
    hub: HubEmulator, srv: RkllamaServer
) -> None:
    files = vision_repo(hub, "test-user/vis-later", "visl")
    model = "visl-Q4_K_M.gguf"

    status, lines, _ = pull(srv, f"hf/test-user/vis-later/{model}+none")

    assert status == 200 and lines[0] == f"Downloading {model} ({len(files[model]) / MB:.2f} MB)..."
    folder = srv.models_dir / "visl-Q4_K_M"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", model]
    assert "MMPROJ" not in modelfile(srv, "visl-Q4_K_M")

    status, lines, _ = pull(srv, f"hf/test-user/vis-later/{model}")

    assert status == 200 and lines[-1] == "100%"
    assert (folder / "mmproj-visl-Q8_0.gguf").read_bytes() == files["mmproj-visl-Q8_0.gguf"]
    assert 'MMPROJ="mmproj-visl-Q8_0.gguf"' in modelfile(srv, "visl-Q4_K_M")
    assert len(hub.downloads("test-user/vis-later", model)) == 1  # the model was in place already


@pytest.mark.parametrize("fault", ["corrupt bytes", "wrong size"])
def test_a_bad_projector_fails_the_whole_pull_and_leaves_nothing(
    hub: HubEmulator, srv: RkllamaServer, fault: str
) -> None:
    repo, stem = f"test-user/vis-bad-{fault.split()[0]}", f"visbad{fault.split()[0]}"
    model, projector = f"{stem}-Q4_K_M.gguf", f"mmproj-{stem}-F16.gguf"
    hub.add_file(repo, model, os.urandom(MB))
    data = os.urandom(MB // 2)
    if fault == "corrupt bytes":
        hub.add_file(repo, projector, data)
        hub.corrupt(projector)
    else:
        hub.add_file(repo, projector, data, advertised_size=len(data) - 1000)
    before = snapshot(srv.models_dir)

    status, lines, _ = pull(srv, f"hf/test-user/{repo.split('/')[1]}/{model}")

    assert status == 200
    assert lines[-1].startswith("Error during download: ") and projector in lines[-1], lines[-1]
    assert "100%" not in lines
    assert snapshot(srv.models_dir) == before  # no folder, no partial file of either file
    assert model.removesuffix(".gguf") not in listed(srv)  # and the server answers


def test_rkllm_pull_brings_its_rknn_vision_encoder(hub: HubEmulator, srv: RkllamaServer) -> None:
    repo = "test-user/npu-vl"
    encoder = os.urandom(MB // 3)
    hub.add_file(repo, "npu-vl.rkllm", os.urandom(MB))
    hub.add_file(repo, "npu-vl-vision.rknn", encoder)
    hub.add_file(repo, "tokenizer.json", b'{"model": {"type": "BPE"}}')

    status, lines, _ = pull(srv, f"hf/{repo}/npu-vl.rkllm")

    assert status == 200 and lines[-1] == "100%"
    assert lines[0].startswith("Downloading npu-vl.rkllm + npu-vl-vision.rknn (")
    folder = srv.models_dir / "npu-vl"
    assert sorted(p.name for p in folder.iterdir()) == [
        "Modelfile",
        "npu-vl-vision.rknn",
        "npu-vl.rkllm",
        "tokenizer.json",
    ]
    assert (folder / "npu-vl-vision.rknn").read_bytes() == encoder
    assert 'VISION_ENCODER="npu-vl-vision.rknn"' in modelfile(srv, "npu-vl")


def test_several_rknn_encoders_must_be_named_and_the_named_one_is_pulled(hub: HubEmulator, srv: RkllamaServer) -> None:
    repo = "test-user/npu-vl2"
    hub.add_file(repo, "npu-vl2.rkllm", os.urandom(MB // 2))
    hub.add_file(repo, "vision-448.rknn", os.urandom(1000))
    hub.add_file(repo, "vision-896.rknn", os.urandom(2000))
    before = snapshot(srv.models_dir)

    status, _, error = pull(srv, f"hf/{repo}/npu-vl2.rkllm")

    assert status == 400
    assert "several .rknn vision encoders" in error["error"] and "+vision-448.rknn" in error["error"]
    assert snapshot(srv.models_dir) == before

    status, lines, _ = pull(srv, f"hf/{repo}/npu-vl2.rkllm+vision-896.rknn")

    assert status == 200 and lines[-1] == "100%"
    assert sorted(p.name for p in (srv.models_dir / "npu-vl2").iterdir()) == [
        "Modelfile",
        "npu-vl2.rkllm",
        "vision-896.rknn",
    ]
    assert 'VISION_ENCODER="vision-896.rknn"' in modelfile(srv, "npu-vl2")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("hf/test-user/vis/vis-Q4_K_M.gguf+../mmproj.gguf", "'..'"),
        ("hf/test-user/vis/vis-Q4_K_M.gguf+", "nothing after '+'"),
        ("hf/test-user/vis/vis-Q4_K_M.gguf+mmproj.rknn", "after '+' comes a projector (.gguf)"),
        ("hf/test-user/npu-vl/npu-vl.rkllm+mmproj.gguf", "after '+' comes a vision encoder (.rknn)"),
        ("hf/test-user/vis/vis-Q4_K_M.gguf+vis-Q4_K_M.gguf", "must differ from the model file"),
        ("hf/test-user/vis/vis-Q4_K_M.gguf+.hidden.gguf", "names starting with '.'"),
        ("hf/test-user/vis/vis-Q4_K_M.gguf+no-such-mmproj.gguf", "File no-such-mmproj.gguf not found in test-user/vis"),
    ],
)
def test_bad_vision_file_names_are_400_and_leave_the_models_dir_alone(
    hub: HubEmulator, srv: RkllamaServer, model: str, message: str
) -> None:
    hub.add_repo("test-user/vis")
    before = snapshot(srv.models_dir)

    status, _, error = pull(srv, model)

    assert status == 400
    assert error["error"].startswith("Error during download: ") and message in error["error"], error
    assert snapshot(srv.models_dir) == before


def test_a_cut_projector_resumes_without_downloading_the_model_again(hub: HubEmulator, srv: RkllamaServer) -> None:
    repo, model, projector = "test-user/vis-cut", "viscut-Q4_K_M.gguf", "mmproj-viscut-Q8_0.gguf"
    files = {model: os.urandom(MB), projector: os.urandom(3 * MB)}
    for path, data in files.items():
        hub.add_file(repo, path, data)
    hub.cut_at(projector, 2 * MB + 12345)

    status, lines, _ = pull(srv, f"hf/{repo}/{model}")

    assert status == 200 and lines[-1].startswith("Error during download: ") and "Pull again to resume" in lines[-1]
    assert not (srv.models_dir / "viscut-Q4_K_M").exists()
    kept = next((srv.models_dir / ".pulls").glob("viscut-Q4_K_M.*.vision.part")).stat().st_size
    assert 0 < kept < len(files[projector])
    hub.heal()

    status, lines, _ = pull(srv, f"hf/{repo}/{model}")

    assert status == 200 and lines[-1] == "100%"
    assert len(hub.downloads(repo, model)) == 1
    assert hub.downloads(repo, projector)[-1].headers.get("range") == f"bytes={kept}-"
    folder = srv.models_dir / "viscut-Q4_K_M"
    assert (folder / model).read_bytes() == files[model] and (folder / projector).read_bytes() == files[projector]
    assert not (srv.models_dir / ".pulls").exists()


def test_ollama_client_pull_reports_each_file_with_its_own_total(hub: HubEmulator, srv: RkllamaServer) -> None:
    files = vision_repo(hub, "test-user/vis-ollama", "viso")
    model, projector = "viso-Q4_K_M.gguf", "mmproj-viso-Q8_0.gguf"

    events = list(ollama.Client(host=srv.base_url).pull(f"hf/test-user/vis-ollama/{model}", stream=True))

    totals = {e.status: e.total for e in events if (e.status or "").startswith("pulling ")}
    assert totals.pop("pulling manifest") == len(files[model]) + len(files[projector])
    assert totals == {f"pulling {model}": len(files[model]), f"pulling {projector}": len(files[projector])}
    assert events[-1].status == "success"
    assert 'MMPROJ="mmproj-viso-Q8_0.gguf"' in modelfile(srv, "viso-Q4_K_M")


def test_cli_pull_shows_the_projector_in_its_progress(hub: HubEmulator, srv: RkllamaServer) -> None:
    vision_repo(hub, "test-user/vis-cli", "viscli")
    env = {**os.environ, "RKLLAMA_HOST": srv.base_url}
    env.pop("RKLLAMA_PORT", None)

    result = subprocess.run(
        [sys.executable, "-m", "rkllama", "pull", "hf/test-user/vis-cli/viscli-Q4_K_M.gguf"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )

    assert result.returncode == 0, result.stderr
    assert "Downloading viscli-Q4_K_M.gguf + mmproj-viscli-Q8_0.gguf" in result.stderr
    assert "Pulled viscli-Q4_K_M." in result.stdout
    assert (srv.models_dir / "viscli-Q4_K_M" / "mmproj-viscli-Q8_0.gguf").is_file()
