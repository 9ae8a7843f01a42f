"""Images in, on the llama.cpp engine, through the official ollama and openai clients.

No real vision model is reachable here, so the vision model is the default SmolLM2 GGUF with
a tiny random projector the test writes (vision_support.py): libmtmd really preprocesses,
encodes and the engine really evaluates the image embeddings; the answers are not about the
picture, so the tests check what a client can: the answer arrives, and the prompt's token
count grows by the image tokens (one image = TINY.tokens_per_image tokens)."""

from __future__ import annotations

import base64
import http.server
import io
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
from PIL import Image

from conftest import RkllamaServer, make_models_dir
from hub_emulator import HubEmulator
from rkllama.store.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME
from test_pull import hub_env
from vision_support import TinyProjector, write_tiny_mmproj

VISION = "SmolVision"
ONE_IMAGE = "SmolVisionOne"  # NUM_PARALLEL=1 and MAX_IMAGES=2 in its Modelfile
SMALL_BATCH = "SmolVisionBatch8"  # NUM_BATCH=8: an image of 16 tokens goes to llama_decode in two pieces
MAX_PIXELS = 1_000_000
GREEDY = {"temperature": 0, "num_predict": 4}


def png(colour: tuple[int, int, int], size: tuple[int, int] = (7, 5)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


RED, BLUE = png((200, 20, 20)), png((20, 20, 200), (300, 200))


def _vision_folder(models: Path, name: str, extra: str = "") -> None:
    folder = models / name
    folder.mkdir()
    source = models / DEFAULT_MODEL_NAME / DEFAULT_MODEL_FILE
    try:
        os.link(source, folder / DEFAULT_MODEL_FILE)
    except OSError:
        shutil.copyfile(source, folder / DEFAULT_MODEL_FILE)
    write_tiny_mmproj(folder / "mmproj-tiny.gguf")
    (folder / "Modelfile").write_text(f'FROM="{DEFAULT_MODEL_FILE}"\nMMPROJ="mmproj-tiny.gguf"\n{extra}')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyProjector:
    return write_tiny_mmproj(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf")


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    root = tmp_path_factory.mktemp("vision")
    models = make_models_dir(root / "models")
    _vision_folder(models, VISION)
    _vision_folder(models, ONE_IMAGE, 'NUM_PARALLEL="1"\nMAX_IMAGES="2"\n')
    _vision_folder(models, SMALL_BATCH, 'NUM_BATCH="8"\n')
    env = {"RKLLAMA_MAX_IMAGES": "4", "RKLLAMA_MAX_IMAGE_PIXELS": str(MAX_PIXELS), "RKLLAMA_MAX_LOADED_MODELS": "4"}
    server = RkllamaServer(models, root / "server.log", env=env).wait_ready()
    yield server
    server.stop()


@pytest.fixture
def ollama_client(vision_server: RkllamaServer) -> ollama.Client:
    return ollama.Client(host=vision_server.base_url)


@pytest.fixture
def openai_client(vision_server: RkllamaServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=vision_server.base_url + "/v1", api_key="unused", max_retries=0)


def openai_prompt_tokens(client: openai.OpenAI, model: str, text: str, images: list[bytes]) -> int:
    parts = [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(i)}} for i in images
    ]
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=2, temperature=0
    )
    assert reply.choices[0].message.content is not None
    return reply.usage.prompt_tokens


# --- what the model says it can do ----------------------------------------------------------
def test_show_lists_vision_only_for_a_model_with_a_projector(ollama_client: ollama.Client) -> None:
    assert "vision" in ollama_client.show(VISION).capabilities
    assert "vision" not in ollama_client.show(DEFAULT_MODEL_NAME).capabilities


# --- images in, counted -----------------------------------------------------------------------
def test_openai_image_url_adds_the_image_tokens_to_the_prompt(
    openai_client: openai.OpenAI, tiny: TinyProjector
) -> None:
    text_only = openai_prompt_tokens(openai_client, VISION, "What is this?", [])
    one = openai_prompt_tokens(openai_client, VISION, "What is this?", [RED])
    two = openai_prompt_tokens(openai_client, VISION, "What is this?", [RED, BLUE])
    assert one == text_only + tiny.tokens_per_image
    assert two == text_only + 2 * tiny.tokens_per_image


def test_ollama_chat_with_an_image_answers_and_counts_the_image(
    ollama_client: ollama.Client, tiny: TinyProjector
) -> None:
    # A picture no earlier request sent, so no cached prefix holds it: its tokens are evaluated.
    picture = png((3, 141, 59))
    seen = ollama_client.chat(
        model=VISION, messages=[{"role": "user", "content": "Which colour?", "images": [picture]}], options=GREEDY
    )
    assert seen.message.content and seen.eval_count > 0
    assert seen.prompt_eval_count > tiny.tokens_per_image


def test_ollama_generate_with_images_streams_an_answer(ollama_client: ollama.Client) -> None:
    chunks = list(
        ollama_client.generate(
            model=VISION, prompt="Describe the pictures.", images=[RED, BLUE], options=GREEDY, stream=True
        )
    )
    assert chunks[-1].done and chunks[-1].eval_count > 0
    assert "".join(c.response for c in chunks)


def test_second_turn_about_an_image_reuses_it_from_the_cache(openai_client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png((1, 200, 90)))}}
    first_turn = [{"role": "user", "content": [{"type": "text", "text": "Second-turn test: what is it?"}, image]}]
    first = openai_client.chat.completions.create(model=VISION, messages=first_turn, max_tokens=4, temperature=0)
    follow_up = first_turn + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And its colour?"},
    ]
    second = openai_client.chat.completions.create(model=VISION, messages=follow_up, max_tokens=4, temperature=0)
    # The whole first prompt, image included, comes from the cache: nothing of it is evaluated again.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_native_generate_takes_images_in_messages(vision_server: RkllamaServer, tiny: TinyProjector) -> None:
    with vision_server.client() as http:
        http.post("/unload_model")  # the spec's /load_model wants no model loaded
        assert http.post("/load_model", json={"model_name": VISION}).status_code == 200
        ask = {"role": "user", "content": "Native: what is it?"}
        plain = http.post("/generate", json={"messages": [ask], "stream": False, "max_tokens": 2}).json()
        seen = http.post(
            "/generate", json={"messages": [{**ask, "images": [b64(RED)]}], "stream": False, "max_tokens": 2}
        ).json()
    assert seen["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + tiny.tokens_per_image


def test_one_sequence_model_takes_images(ollama_client: ollama.Client) -> None:
    reply = ollama_client.chat(
        model=ONE_IMAGE, messages=[{"role": "user", "content": "One slot: what?", "images": [RED]}], options=GREEDY
    )
    assert reply.message.content and reply.eval_count > 0


def test_image_longer_than_the_batch_is_answered_and_counted_whole(
    openai_client: openai.OpenAI, tiny: TinyProjector
) -> None:
    text_only = openai_prompt_tokens(openai_client, SMALL_BATCH, "Small batch?", [])
    with_image = openai_prompt_tokens(openai_client, SMALL_BATCH, "Small batch?", [png((5, 99, 5))])
    assert with_image == text_only + tiny.tokens_per_image


def test_images_in_parallel_requests_each_get_their_answer(vision_server: RkllamaServer, tiny: TinyProjector) -> None:
    client = openai.OpenAI(base_url=vision_server.base_url + "/v1", api_key="unused", max_retries=0)
    text_only = openai_prompt_tokens(client, VISION, "Parallel?", [])
    counts: dict[int, int] = {}

    def ask(n: int) -> None:
        counts[n] = openai_prompt_tokens(client, VISION, "Parallel?", [png((n * 60, 10, 10))] * n)

    threads = [threading.Thread(target=ask, args=(n,)) for n in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == {n: text_only + n * tiny.tokens_per_image for n in (1, 2, 3)}


# --- bad input: clear 400s -------------------------------------------------------------------
def _ollama_error(client: ollama.Client, model: str, images: list[str | bytes]) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model=model, messages=[{"role": "user", "content": "What?", "images": images}], options=GREEDY)
    assert error.value.status_code == 400
    return error.value


def test_undecodable_image_is_a_400_naming_it(ollama_client: ollama.Client) -> None:
    error = _ollama_error(ollama_client, VISION, [RED, b64(b"this is not a picture")])
    assert error.error == "'messages.0.images.1' is not an image this server reads: send PNG, JPEG, WebP, GIF or BMP."


def test_truncated_image_is_a_400(ollama_client: ollama.Client) -> None:
    error = _ollama_error(ollama_client, VISION, [b64(BLUE[: len(BLUE) // 2])])
    assert error.error.startswith("'messages.0.images.0' could not be decoded as an image")


def test_image_over_the_pixel_limit_is_a_400(ollama_client: ollama.Client) -> None:
    error = _ollama_error(ollama_client, VISION, [b64(png((9, 9, 9), (1001, 1000)))])
    assert error.error.startswith(f"'messages.0.images.0' is 1001x1000 pixels (1001000); at most {MAX_PIXELS} pixels")


def test_more_images_than_the_server_allows_is_a_400(ollama_client: ollama.Client) -> None:
    error = _ollama_error(ollama_client, VISION, [RED] * 5)
    assert error.error == "The request holds 5 images; at most 4 are allowed (setting RKLLAMA_MAX_IMAGES)."


def test_more_images_than_the_model_allows_is_a_400(ollama_client: ollama.Client) -> None:
    error = _ollama_error(ollama_client, ONE_IMAGE, [RED] * 3)
    assert (
        error.error == f"The request holds 3 images; model {ONE_IMAGE} takes at most 2 (MAX_IMAGES in its Modelfile)."
    )


def test_model_without_a_projector_refuses_images(ollama_client: ollama.Client) -> None:
    error = _ollama_error(ollama_client, DEFAULT_MODEL_NAME, [RED])
    assert error.error.startswith(f"Model {DEFAULT_MODEL_NAME} cannot read images: it has no vision encoder.")


def test_openai_remote_image_url_is_refused_by_default(openai_client: openai.OpenAI) -> None:
    part = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/picture.png"}}
    with pytest.raises(openai.BadRequestError) as error:
        openai_client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": [part]}])
    assert error.value.body["message"].startswith(
        "'messages.0.content.0.image_url' is a remote URL; this server does not fetch URLs."
    )


def test_openai_data_url_of_another_type_is_a_400(openai_client: openai.OpenAI) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}
    with pytest.raises(openai.BadRequestError) as error:
        openai_client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": [part]}])
    assert error.value.body["message"] == (
        "'messages.0.content.0.image_url.url' is a data URL of type 'text/plain'; only images are accepted."
    )


def test_bad_image_leaves_the_model_serving(ollama_client: ollama.Client) -> None:
    _ollama_error(ollama_client, VISION, [b64(b"\x89PNG\r\n\x1a\n broken")])
    reply = ollama_client.chat(model=VISION, messages=[{"role": "user", "content": "Still there?", "images": [RED]}])
    assert reply.done


# --- remote URLs, when the setting allows them ------------------------------------------------
class _Picture(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = RED if self.path == "/red.png" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_remote_image_url_is_fetched_when_the_setting_allows_it(start_server, tmp_path: Path) -> None:
    pictures = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Picture)
    threading.Thread(target=pictures.serve_forever, daemon=True).start()
    try:
        models = make_models_dir(tmp_path / "models")
        _vision_folder(models, VISION)
        server = start_server(models_dir=models, env={"RKLLAMA_IMAGE_URLS": "1"})
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        base = f"http://127.0.0.1:{pictures.server_address[1]}"
        text_only = openai_prompt_tokens(client, VISION, "Remote?", [])
        part = {"type": "image_url", "image_url": {"url": base + "/red.png"}}
        messages = [{"role": "user", "content": [{"type": "text", "text": "Remote?"}, part]}]
        reply = client.chat.completions.create(model=VISION, messages=messages, max_tokens=2, temperature=0)
        assert reply.usage.prompt_tokens == text_only + write_tiny_mmproj(tmp_path / "p.gguf").tokens_per_image
        missing = {"type": "image_url", "image_url": {"url": base + "/missing.png"}}
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": [missing]}])
        assert error.value.body["message"] == f"The image URL {base}/missing.png answered HTTP 404."
    finally:
        pictures.shutdown()


def test_request_with_images_to_a_model_without_vision_loads_nothing(vision_server: RkllamaServer) -> None:
    with vision_server.client() as http:
        http.post("/unload_model")
        response = http.post("/api/generate", json={"model": DEFAULT_MODEL_NAME, "prompt": "x", "images": [b64(RED)]})
        assert response.status_code == 400
        assert DEFAULT_MODEL_NAME not in [m["name"] for m in http.get("/api/ps").json()["models"]]


# --- from a pull to an answer about a picture ----------------------------------------------
def test_pulled_vision_model_answers_about_a_picture(start_server, tmp_path: Path) -> None:
    models = make_models_dir(tmp_path / "models")
    weights = (models / DEFAULT_MODEL_NAME / DEFAULT_MODEL_FILE).read_bytes()
    projector = write_tiny_mmproj(tmp_path / "mmproj-SmolVLM-tiny-F16.gguf")
    with HubEmulator() as hub:
        hub.add_file("test-user/SmolVLM-tiny-GGUF", "SmolVLM-tiny-Q4_1.gguf", weights)
        hub.add_file("test-user/SmolVLM-tiny-GGUF", projector.path.name, projector.path.read_bytes())
        server = start_server(models_dir=models, env=hub_env(hub.url, tmp_path / "hf-home"))
        client = ollama.Client(host=server.base_url)
        done = list(client.pull("hf/test-user/SmolVLM-tiny-GGUF/SmolVLM-tiny-Q4_1.gguf", stream=True))[-1]
        assert done.status == "success"
    assert "vision" in client.show("SmolVLM-tiny-Q4_1").capabilities
    reply = client.chat(
        model="SmolVLM-tiny-Q4_1",
        messages=[{"role": "user", "content": "What is in the picture?", "images": [RED]}],
        options=GREEDY,
    )
    assert reply.message.content and reply.prompt_eval_count > projector.tokens_per_image


def test_prompt_cut_inside_an_image_drops_the_rest_of_the_image(
    ollama_client: ollama.Client, tiny: TinyProjector
) -> None:
    # num_ctx 32 with 4 tokens of reply leaves 28 for the prompt: the cut from the front goes
    # through the system prompt (~20 tokens) into the image, whose rest must go too.
    text = "Cut test: alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"
    reply = ollama_client.chat(
        model=VISION,
        messages=[{"role": "user", "content": text, "images": [png((77, 7, 177))]}],
        options={"num_ctx": 32, "num_predict": 4, "temperature": 0},
    )
    assert reply.message.content
    assert 28 - tiny.tokens_per_image < reply.prompt_eval_count < 28


def test_native_generate_counts_all_images_before_decoding_any(vision_server: RkllamaServer) -> None:
    broken = b64(b"not a picture")
    messages = [{"role": "user", "content": f"Part {n}", "images": [broken, broken]} for n in range(3)]
    with vision_server.client() as http:
        response = http.post("/generate", json={"messages": messages, "stream": False})
    assert response.status_code == 400
    assert response.json()["error"] == "The request holds 6 images; at most 4 are allowed (setting RKLLAMA_MAX_IMAGES)."
