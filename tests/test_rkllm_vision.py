"""Images on the rkllm engine: the .rknn encoder (on the rknn C double, tests/rknn_double) and
RKLLM_INPUT_MULTIMODAL (on the rkllm C double, which logs what it gets and answers
"images=<n> image_tokens=<total>" and the prompt's words), through the real server and the
official ollama and openai clients, for every runtime ABI."""

from __future__ import annotations

import base64
import ctypes
import io
import re
import subprocess
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from PIL import Image

from rkllama.runner.engines import rknn_library
from rkllama.runner.engines.base import EngineError
from rkllama.runner.engines.rkllm_vision import PAD_GREY, ImageEncoder, fit_image
from rkllama.store.modelfile import Modelfile
from rkllm_support import double_env, log_lines, rkllm_doubles
from rknn_support import build_rknn_layout_program, rknn_double, write_fake_encoder
from test_rkllm_server import _word_tokenizer

__all__ = ["rkllm_doubles", "rknn_double"]  # fixtures, imported for pytest

ABIS = ["1.1", "1.2.0", "1.2", "1.3"]
ABI_NUMBER = {"1.1": 110, "1.2.0": 120, "1.2": 121, "1.3": 130}
QWEN_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
RED, BLUE = (200, 20, 20), (20, 20, 200)
EMBED = 16  # the fake encoder's width, and the rkllm double's RKLLM_DOUBLE_EMBED_DIM


def png(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def multimodal_lines(log: Path) -> list[dict[str, str]]:
    """The double's "multimodal ..." lines as {field: value} (bracketed values without brackets)."""
    found = []
    for line in log_lines(log):
        if line.startswith("multimodal "):
            found.append({k: a or b for k, a, b in re.findall(r"(\w+)=(?:\[(.*?)\]|(\S+))", line)})
    return found


# --- the rknn binding and the encoder, in this process ---------------------------------------
def test_rknn_structs_match_c(tmp_path: Path) -> None:
    program = build_rknn_layout_program(tmp_path)
    lines = [
        line.split()
        for line in subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout.splitlines()
    ]
    checked = 0
    for line in lines:
        if line[0] == "S" and line[1] == "rknn_context":
            assert ctypes.sizeof(rknn_library.RknnContext) == int(line[2])
        elif line[0] == "S":
            assert ctypes.sizeof(rknn_library.STRUCTS[line[1]]) == int(line[2]), f"sizeof({line[1]})"
        else:
            _, struct, name, offset = line
            assert getattr(rknn_library.STRUCTS[struct], name).offset == int(offset), f"offsetof({struct}, {name})"
        checked += 1
    assert {line[1] for line in lines if line[0] == "S"} == {*rknn_library.STRUCTS, "rknn_context"}
    assert checked > 30


@pytest.fixture
def encoder_env(rknn_double: Path, tmp_path: Path, monkeypatch) -> Path:
    log = tmp_path / "rknn.log"
    monkeypatch.setenv("RKLLAMA_RKNN_LIB", str(rknn_double))
    monkeypatch.setenv("RKNN_DOUBLE_LOG", str(log))
    return log


def rknn_lines(log: Path, prefix: str) -> list[str]:
    return [line for line in log_lines(log) if line.startswith(prefix)]


def test_encoder_reads_its_sizes_and_the_runtime_version_from_the_model(encoder_env: Path, tmp_path: Path) -> None:
    fake = write_fake_encoder(tmp_path / "enc.rknn", height=6, width=10, tokens=5, embed=7)
    encoder = ImageEncoder(str(fake.path), Modelfile({}))
    try:
        assert (encoder.width, encoder.height, encoder.n_tokens, encoder.token_width) == (10, 6, 5, 7)
        assert encoder.version == "2.3.2 (rknn double)"
        assert (encoder.markers.start, encoder.markers.end, encoder.markers.content) == QWEN_MARKERS
    finally:
        encoder.close()
    assert rknn_lines(encoder_env, "destroy")
    nchw = write_fake_encoder(tmp_path / "nchw.rknn", height=6, width=10, fmt="nchw")
    encoder = ImageEncoder(str(nchw.path), Modelfile({"IMAGE_WIDTH": "20", "IMAGE_HEIGHT": "12"}))
    assert (encoder.width, encoder.height) == (20, 12)  # the Modelfile's size wins over the model's
    encoder.close()


def test_an_image_is_fitted_keeping_its_aspect_on_grey() -> None:
    wide = Image.new("RGB", (40, 20), RED)
    fitted = fit_image(wide, 8, 8)
    assert fitted.size == (8, 8)
    assert fitted.getpixel((4, 0)) == (PAD_GREY,) * 3 and fitted.getpixel((4, 7)) == (PAD_GREY,) * 3
    assert fitted.getpixel((0, 4)) == RED and fitted.getpixel((7, 4)) == RED
    assert fit_image(Image.new("L", (3, 3), 255), 4, 4).getpixel((2, 2)) == (255, 255, 255)  # made RGB


def test_embeddings_are_the_encoders_output_for_the_pixels_sent(encoder_env: Path, tmp_path: Path) -> None:
    fake = write_fake_encoder(tmp_path / "enc.rknn", tokens=4, embed=EMBED)
    encoder = ImageEncoder(str(fake.path), Modelfile({}))
    try:
        values = list(encoder.encode(b64(png(RED))))
        again = encoder.encode(b64(png(RED)))  # the same picture: from the cache
    finally:
        encoder.close()
    assert len(values) == fake.tokens * EMBED
    assert values == pytest.approx(fake.token_values(RED) * fake.tokens, abs=1e-5)
    assert list(again) == values
    sent = rknn_lines(encoder_env, "inputs_set")
    assert len(sent) == 1  # encoded once
    assert f"size={8 * 8 * 3} type=uint8 fmt=nhwc first={200 / 255:.4f},{20 / 255:.4f},{20 / 255:.4f}" in sent[0]
    assert rknn_lines(encoder_env, "outputs_release n=1")


def test_image_mean_and_std_send_the_image_normalised_as_float32(encoder_env: Path, tmp_path: Path) -> None:
    fake = write_fake_encoder(tmp_path / "enc.rknn")
    modelfile = Modelfile({"IMAGE_MEAN": "0.5,0.5,0.5", "IMAGE_STD": "0.25"})
    encoder = ImageEncoder(str(fake.path), modelfile)
    try:
        encoder.encode(b64(png((255, 0, 255))))
    finally:
        encoder.close()
    # (1 - 0.5) / 0.25 = 2 and (0 - 0.5) / 0.25 = -2, sent as NCHW planes.
    assert "type=float32 fmt=nchw first=2.0000,-2.0000,2.0000" in rknn_lines(encoder_env, "inputs_set")[0]
    with pytest.raises(EngineError, match="IMAGE_MEAN and IMAGE_STD go together"):
        ImageEncoder(str(fake.path), Modelfile({"IMAGE_MEAN": "0.5"}))
    with pytest.raises(EngineError, match="IMAGE_STD must be three numbers"):
        ImageEncoder(str(fake.path), Modelfile({"IMAGE_MEAN": "0.5", "IMAGE_STD": "0,1,1"}))


def test_several_outputs_are_joined_token_by_token(encoder_env: Path, tmp_path: Path) -> None:
    fake = write_fake_encoder(tmp_path / "deep.rknn", tokens=2, embed=3, outputs=3)
    encoder = ImageEncoder(str(fake.path), Modelfile({}))
    try:
        assert encoder.token_width == 9
        values = list(encoder.encode(b64(png(BLUE))))
    finally:
        encoder.close()
    assert values == pytest.approx(fake.token_values(BLUE) * 2, abs=1e-5)
    assert rknn_lines(encoder_env, "outputs_release n=3")


def test_a_wrong_n_image_tokens_or_a_broken_encoder_is_a_clear_error(
    encoder_env: Path, tmp_path: Path, monkeypatch
) -> None:
    fake = write_fake_encoder(tmp_path / "enc.rknn", tokens=4)
    with pytest.raises(EngineError, match="N_IMAGE_TOKENS=9, but the vision encoder enc.rknn gives 4"):
        ImageEncoder(str(fake.path), Modelfile({"N_IMAGE_TOKENS": "9"}))
    (tmp_path / "junk.rknn").write_bytes(b"not a model")
    with pytest.raises(EngineError, match=r"rknn_init failed \(code -6\) for the vision encoder junk.rknn"):
        ImageEncoder(str(tmp_path / "junk.rknn"), Modelfile({}))
    monkeypatch.setenv("RKLLAMA_RKNN_LIB", str(tmp_path / "none.so"))
    with pytest.raises(EngineError, match="RKLLAMA_RKNN_LIB=.* does not exist. Install librknnrt.so"):
        ImageEncoder(str(fake.path), Modelfile({}))


# --- through the server ---------------------------------------------------------------------
VISION, PLAIN = "vis", "plain"


@pytest.fixture
def vision_server(start_server, tmp_path: Path, rkllm_doubles, rknn_double):
    """start(abi, modelfile_extra="") -> (server, rkllm log, fake encoder, rknn log)."""

    def start(abi: str = "1.3", extra: str = "", tokenizer: bool = False, **env: str):
        models = tmp_path / "models"
        for name in (VISION, PLAIN):
            (models / name).mkdir(parents=True, exist_ok=True)
            (models / name / f"{name}.rkllm").write_bytes(b"RKLLM test model")
        fake = write_fake_encoder(models / VISION / "vision.rknn", tokens=4, embed=EMBED)
        (models / VISION / "Modelfile").write_text(f'FROM="{VISION}.rkllm"\nVISION_ENCODER="vision.rknn"\n{extra}')
        (models / PLAIN / "Modelfile").write_text(f'FROM="{PLAIN}.rkllm"\n')
        if tokenizer:
            _word_tokenizer(models / VISION)
        log, rknn_log = tmp_path / "rkllm.log", tmp_path / "rknn.log"
        full_env = double_env(
            rkllm_doubles[abi],
            log,
            RKLLM_DOUBLE_EMBED_DIM=str(EMBED),
            RKLLAMA_RKNN_LIB=str(rknn_double),
            RKNN_DOUBLE_LOG=str(rknn_log),
            **env,
        )
        srv = start_server(models_dir=models, args=["--no-default"], env=full_env, expect_model=False)
        return srv, log, fake, rknn_log

    return start


@pytest.mark.parametrize("abi", ABIS)
def test_ollama_chat_image_reaches_the_runtime_as_its_abi_wants(vision_server, abi: str) -> None:
    srv, log, fake, _ = vision_server(abi)
    client = ollama.Client(host=srv.base_url)
    reply = client.chat(model=VISION, messages=[{"role": "user", "content": "what is this", "images": [png(RED)]}])
    assert reply.message.content == "images=1 image_tokens=4 what is this"
    [seen] = multimodal_lines(log)
    assert seen["prompt"] == "<image>what is this" and seen["markers"] == "1"
    assert float(seen["embed_sum"]) == pytest.approx(fake.embedding_sum(RED), abs=1e-3)
    assert (seen["image_start"], seen["image_end"], seen["image_content"]) == QWEN_MARKERS
    assert seen["n_image"] == "1" and seen["n_image_tokens"] == "4"
    sized = ABI_NUMBER[abi] >= 121  # image_width/height exist from 1.2.1 on
    assert (seen["image_width"], seen["image_height"]) == (("8", "8") if sized else ("0", "0"))
    init_markers = [line for line in log_lines(log) if line.startswith("init_image")]
    if ABI_NUMBER[abi] < 130:  # before 1.3 the markers are RKLLMParam settings at init
        assert init_markers == [
            "init_image img_start=[<|vision_start|>] img_end=[<|vision_end|>] img_content=[<|image_pad|>]"
        ]
    else:
        assert not init_markers
    # 1.2.1+ report the prefill (3 words + 4 image tokens); before, only the image tokens are known.
    assert reply.prompt_eval_count == (7 if sized else 4)


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_openai_two_images_count_twice(vision_server, abi: str) -> None:
    srv, log, fake, _ = vision_server(abi)
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)
    parts = [{"type": "text", "text": "compare them"}] + [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png(c))}} for c in (RED, BLUE)
    ]
    reply = client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": parts}])
    assert reply.choices[0].message.content == "images=2 image_tokens=8 compare them"
    assert reply.usage.prompt_tokens == 2 + 2 * fake.tokens
    [seen] = multimodal_lines(log)
    assert seen["prompt"] == "<image><image>compare them" and seen["n_image"] == "2"
    expected = fake.embedding_sum(RED) + fake.embedding_sum(BLUE)
    assert float(seen["embed_sum"]) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("abi", ["1.1", "1.2.0"])
def test_runtimes_before_1_2_1_refuse_two_images_with_a_400(vision_server, abi: str) -> None:
    srv, log, _, _ = vision_server(abi)
    images = [b64(png(RED)), b64(png(BLUE))]
    with srv.client() as client:
        refused = client.post(
            "/api/chat",
            json={"model": VISION, "stream": False, "messages": [{"role": "user", "content": "x", "images": images}]},
        )
    assert refused.status_code == 400
    assert "takes one image per request (this one holds 2)" in refused.json()["error"]
    assert not multimodal_lines(log)


def test_ollama_generate_with_an_image_streams_the_answer(vision_server) -> None:
    srv, log, fake, _ = vision_server("1.3")
    chunks = list(
        ollama.Client(host=srv.base_url).generate(model=VISION, prompt="describe", images=[png(BLUE)], stream=True)
    )
    assert "".join(c.response for c in chunks) == "images=1 image_tokens=4 describe"
    assert chunks[-1].done and chunks[-1].prompt_eval_count == 1 + fake.tokens
    [seen] = multimodal_lines(log)
    assert float(seen["embed_sum"]) == pytest.approx(fake.embedding_sum(BLUE), abs=1e-3)


def test_a_follow_up_sends_only_its_own_turn_and_images(vision_server) -> None:
    srv, log, fake, rknn_log = vision_server("1.3")
    client = ollama.Client(host=srv.base_url)
    first = [{"role": "user", "content": "see", "images": [png(RED)]}]
    answer = client.chat(model=VISION, messages=first).message.content
    text_turn = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "and now"}]
    assert client.chat(model=VISION, messages=text_turn).message.content == "and now"
    runs = [line for line in log_lines(log) if line.startswith("run ")]
    assert "input_type=0 " in runs[-1] and "keep_history=1 " in runs[-1]  # the picture stays in the cache
    second = client.chat(model=VISION, messages=text_turn)
    image_turn = [*text_turn, {"role": "assistant", "content": second.message.content}]
    image_turn.append({"role": "user", "content": "this one", "images": [png(BLUE)]})
    assert client.chat(model=VISION, messages=image_turn).message.content == "images=1 image_tokens=4 this one"
    last = multimodal_lines(log)[-1]
    assert last["prompt"] == "<image>this one" and last["n_image"] == "1"
    assert float(last["embed_sum"]) == pytest.approx(fake.embedding_sum(BLUE), abs=1e-3)


def test_a_model_without_vision_encoder_refuses_images_with_a_400(vision_server) -> None:
    srv, _, _, _ = vision_server("1.3")
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=srv.base_url).chat(
            model=PLAIN, messages=[{"role": "user", "content": "what is this", "images": [png(RED)]}]
        )
    assert refused.value.status_code == 400 and "cannot read images" in refused.value.error
    reply = ollama.Client(host=srv.base_url).chat(model=PLAIN, messages=[{"role": "user", "content": "still fine"}])
    assert reply.message.content == "still fine"


def test_the_image_marker_in_a_text_with_images_is_a_400(vision_server) -> None:
    srv, log, _, _ = vision_server("1.3")
    body = {
        "model": VISION,
        "stream": False,
        "messages": [{"role": "user", "content": "a <image> b", "images": [b64(png(RED))]}],
    }
    with srv.client() as client:
        refused = client.post("/api/chat", json=body)
        assert refused.status_code == 400 and "may not contain '<image>'" in refused.json()["error"]
        # Without images the same text is plain text.
        ok = client.post("/api/chat", json={**body, "messages": [{"role": "user", "content": "a <image> b"}]})
    assert ok.status_code == 200 and ok.json()["message"]["content"] == "a <image> b"
    assert not multimodal_lines(log)


def test_modelfile_image_markers_reach_the_runtime(vision_server) -> None:
    srv, log, _, _ = vision_server("1.3", 'IMG_START="<s>"\nIMG_END="<e>"\nIMG_CONTENT="<p>"\n')
    reply = ollama.Client(host=srv.base_url).chat(
        model=VISION, messages=[{"role": "user", "content": "x", "images": [png(RED)]}]
    )
    assert reply.message.content == "images=1 image_tokens=4 x"
    [seen] = multimodal_lines(log)
    assert (seen["image_start"], seen["image_end"], seen["image_content"]) == ("<s>", "<e>", "<p>")


def test_an_encoder_the_runtime_cannot_load_is_a_clear_400(vision_server) -> None:
    srv, _, _, _ = vision_server("1.3", RKNN_DOUBLE_FAIL="init")
    with httpx.Client(base_url=srv.base_url, timeout=60) as client:
        refused = client.post("/load_model", json={"model_name": VISION})
        assert refused.status_code == 400
        assert "rknn_init failed (code -1) for the vision encoder vision.rknn" in refused.json()["error"]
        assert client.post("/load_model", json={"model_name": PLAIN}).status_code == 200


def test_show_lists_vision_only_for_the_model_with_an_encoder(vision_server) -> None:
    srv, _, _, _ = vision_server("1.3")
    client = ollama.Client(host=srv.base_url)
    assert "vision" in client.show(VISION).capabilities
    assert "vision" not in client.show(PLAIN).capabilities


def test_with_tokenizer_files_an_image_request_uses_the_runtime_template(vision_server) -> None:
    # RKLLM_INPUT_MULTIMODAL takes text, so a picture goes with the runtime's template; text alone
    # is still rendered with the model's own chat template and sent as tokens.
    srv, log, _, _ = vision_server("1.3", tokenizer=True)
    client = ollama.Client(host=srv.base_url)
    seen = client.chat(model=VISION, messages=[{"role": "user", "content": "hello", "images": [png(RED)]}])
    assert seen.message.content == "images=1 image_tokens=4 hello"
    assert multimodal_lines(log)[0]["prompt"] == "<image>hello"
    text = client.chat(model=VISION, messages=[{"role": "user", "content": "hello world"}])
    assert text.message.content == "1 4 8 9 2 1 5"  # the double echoes the template's token ids
    runs = [line for line in log_lines(log) if line.startswith(("run ", "clear_kv_cache"))]
    assert "input_type=3 " in runs[0] and runs[1].startswith("clear_kv_cache") and "input_type=1 " in runs[2]
