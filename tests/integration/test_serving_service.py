"""The serving service against a real nats-server: deployments of registered versions of a real
tiny fine-tune, driven through the official `openai` client (chat and completions, streamed and
not, /v1/models) and raw gRPC `Generate`; greedy output equal to `transformers` generate on the
same adapter token for token; tenant isolation; a deployment following production switching
versions without cutting a running stream; overload answered 429 / RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio

import grpc
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
openai = pytest.importorskip("openai")

from llmstudio.bus import Bus  # noqa: E402
from llmstudio.config import Settings  # noqa: E402
from llmstudio.events import (  # noqa: E402
    JobSucceeded,
    ModelAliasMoved,
    ModelStageChanged,
    ModelVersionDeleted,
    ModelVersionRegistered,
)
from llmstudio.jobspec import JobSpec  # noqa: E402
from llmstudio.ml.checkpoint import store_prefix  # noqa: E402
from llmstudio.ml.tiny import build_tiny_model  # noqa: E402
from llmstudio.natsserver import free_port  # noqa: E402
from llmstudio.storage import LocalArtifactStore  # noqa: E402
from llmstudio.v1 import serving_pb2 as pb  # noqa: E402
from llmstudio.v1 import serving_pb2_grpc  # noqa: E402
from services.serving.app import build  # noqa: E402
from services.trainer.recipes import TrainRequest, train  # noqa: E402
from tests.support.harness import put_api_key, running  # noqa: E402
from tests.support.waiting import wait_for_async  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]  # trains

ROWS = [{"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
        for w in ("apple", "river", "stone", "cat", "dog", "moon", "sun", "tree")]
OTHER_ROWS = [{"prompt": f"say {w} once:", "completion": f" {w}"} for w in ("apple", "river")]
MESSAGES = [{"role": "user", "content": "say apple twice:"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(models root, base model dir, {version: adapter dir}): two LoRA fine-tunes of one base."""
    root = tmp_path_factory.mktemp("models")
    base = str(build_tiny_model(root / "tiny"))
    adapters = {}
    for version, (rows, seed) in {1: (ROWS, 1), 2: (OTHER_ROWS, 2)}.items():
        spec = JobSpec(base_model=base, dataset="ds-1",
                       lora={"r": 8, "alpha": 16, "dropout": 0.0},
                       hyperparameters={"max_steps": 6, "batch_size": 4,
                                        "learning_rate": 3e-2, "seed": seed})
        result = train(TrainRequest(spec, rows, tmp_path_factory.mktemp(f"run{version}")))
        adapters[version] = result.adapter_dir
    return root, base, adapters


def reference(base: str, adapter, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate on the base with the adapter (as exported: peft's files):
    the new tokens, up to and with the end-of-sequence token (counted, as OpenAI counts it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()  # up to and with its end-of-sequence token


@pytest.fixture
async def stack(nats_server, tmp_path, models):
    """(settings, grpc port, keys by role, publish(event, tenant)) of a serving service that has
    heard of acme's tiny-lora v1 (production) and v2 (staging), each a fine-tune of one base."""
    root, base, adapters = models
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                        serving_http_port=free_port(), model_roots=[root],
                        serving_max_batch_size=4, serving_max_queue=8)
    store = LocalArtifactStore(settings.artifact_root or tmp_path / "artifacts")
    keys = {"developer": await put_api_key(nats_server.url, "developer", "acme"),
            "viewer": await put_api_key(nats_server.url, "viewer", "acme"),
            "outsider": await put_api_key(nats_server.url, "admin", "globex")}
    bus = Bus(settings, "test")
    await bus.start()

    async def publish(event, tenant: str = "acme") -> None:
        await bus.publish(event, tenant=tenant, actor="registry")

    for version, adapter in adapters.items():
        key = store.put_dir(store_prefix("acme", f"job-{version}", 6), adapter).rstrip("/")
        await publish(JobSucceeded(
            job_id=f"job-{version}", worker_id="w1", model_name="tiny-lora",
            spec={"base_model": base, "dataset": "ds-1"}, dataset_id="ds-1",
            dataset_sha256="ab" * 32, dataset_artifacts={}, checkpoint_key=key,
            adapter_key=key, steps=6, final_loss=1.0))
        await publish(ModelVersionRegistered(ref=f"tiny-lora-v{version}", model_name="tiny-lora",
                                             version=version, job_id=f"job-{version}",
                                             dataset_sha256="ab" * 32))
    await publish(ModelStageChanged(ref="tiny-lora-v1", model_name="tiny-lora", version=1,
                                    from_stage="staging", to_stage="production"))
    try:
        async with running("serving", build, settings) as port:
            yield settings, port, keys, publish
    finally:
        await bus.stop()


def stub(port: int):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, serving_pb2_grpc.ServingServiceStub(channel)


def md(key: str):
    return (("x-api-key", key),)


async def deploy(port: int, key: str, model: str, name: str) -> pb.Deployment:
    """CreateDeployment, retried while serving has not heard of the version yet."""
    channel, svc = stub(port)
    async with channel:
        async def attempt():
            try:
                d = await svc.CreateDeployment(pb.CreateDeploymentRequest(model=model, name=name),
                                               metadata=md(key))
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise
            if d.status == "ready":
                return d
            # made before serving heard which version the stage holds: again, from scratch
            await svc.DeleteDeployment(pb.DeleteDeploymentRequest(name=name), metadata=md(key))
            return None

        return await wait_for_async(attempt, 30, f"deployment {name} of {model}")


async def generate(port: int, key: str, **request) -> list[pb.GenerateChunk]:
    channel, svc = stub(port)
    async with channel:
        return [c async for c in svc.Generate(pb.GenerateRequest(**request), metadata=md(key))]


def client(settings: Settings, key: str):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{settings.serving_http_port}/v1",
                              api_key=key, max_retries=0)


async def test_openai_and_grpc_answers_equal_transformers_greedy_generate(stack, models):
    settings, port, keys, _ = stack
    _, base, adapters = models
    deployed = await deploy(port, keys["developer"], "tiny-lora@production", "tiny")
    assert (deployed.version, deployed.follows, deployed.base_model) == (1, "production", base)

    # gRPC: the token ids, then transformers on the same prompt ids
    chunks = await generate(port, keys["viewer"], deployment="tiny", messages=MESSAGES,
                            max_tokens=12, temperature=0.0)
    ids = [t for c in chunks for t in c.token_ids]
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and {c.version for c in chunks} == {1}
    assert last.completion_tokens == len(ids) and last.prompt_tokens > 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    assert len(prompt_ids) == last.prompt_tokens
    assert ids == reference(base, adapters[1], list(prompt_ids), 12)
    text = "".join(c.text for c in chunks)

    # the same through the OpenAI API, whole and streamed
    api = client(settings, keys["viewer"])
    assert [m.id for m in (await api.models.list()).data] == ["tiny"]
    whole = await api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                              temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == last.finish_reason
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        last.prompt_tokens, last.completion_tokens)
    stream = await api.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    async for event in stream:
        if event.usage:
            usage = event.usage
        for choice in event.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text and finish == last.finish_reason
    assert usage.completion_tokens == last.completion_tokens

    # a plain completion: the prompt as the tokenizer encodes it
    plain = await api.completions.create(model="tiny", prompt="say apple twice:", max_tokens=8,
                                         temperature=0)
    plain_ids = tokenizer("say apple twice:").input_ids
    assert plain.usage.prompt_tokens == len(plain_ids)
    expected = tokenizer.decode(reference(base, adapters[1], plain_ids, 8),
                                skip_special_tokens=True)
    assert plain.choices[0].text == expected
    streamed = await api.completions.create(model="tiny", prompt="say apple twice:",
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join([c.choices[0].text async for c in streamed if c.choices]) == expected

    # a seeded sample is the same twice
    sampled = [(await api.completions.create(model="tiny", prompt="say", max_tokens=8,
                                             temperature=1.0, top_p=0.9, seed=7)
                ).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


async def test_another_tenant_and_bad_keys_get_nothing(stack):
    settings, port, keys, _ = stack
    await deploy(port, keys["developer"], "tiny-lora@1", "tiny-fixed")
    outsider = client(settings, keys["outsider"])
    assert (await outsider.models.list()).data == []
    with pytest.raises(openai.NotFoundError):
        await outsider.chat.completions.create(model="tiny-fixed", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        await client(settings, "not-a-key").models.list()
    for request in ({"deployment": "tiny-fixed", "prompt": "hi"},):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await generate(port, keys["outsider"], **request)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    channel, svc = stub(port)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await svc.GetDeployment(pb.GetDeploymentRequest(name="tiny-fixed"),
                                    metadata=md(keys["outsider"]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:  # viewers read, they do not deploy
            await svc.CreateDeployment(pb.CreateDeploymentRequest(model="tiny-lora@1", name="x"),
                                       metadata=md(keys["viewer"]))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await svc.CreateDeployment(pb.CreateDeploymentRequest(model="tiny-lora@9", name="y"),
                                       metadata=md(keys["developer"]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await svc.CreateDeployment(pb.CreateDeploymentRequest(model="tiny lora", name="y"),
                                       metadata=md(keys["developer"]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_promotion_switches_a_following_deployment_and_a_running_stream_completes(stack):
    settings, port, keys, publish = stack
    await deploy(port, keys["developer"], "tiny-lora@production", "prod")
    channel, svc = stub(port)
    async with channel:
        running_stream = svc.Generate(pb.GenerateRequest(
            deployment="prod", prompt="say moon twice:", max_tokens=24, temperature=0.0),
            metadata=md(keys["viewer"]))
        first = await running_stream.read()
        assert first.version == 1
        # v2 is promoted (the registry archives v1 first) while the stream is open
        await publish(ModelStageChanged(ref="tiny-lora-v1", model_name="tiny-lora", version=1,
                                        from_stage="production", to_stage="archived"))
        await publish(ModelStageChanged(ref="tiny-lora-v2", model_name="tiny-lora", version=2,
                                        from_stage="staging", to_stage="production"))

        async def switched():
            d = await svc.GetDeployment(pb.GetDeploymentRequest(name="prod"),
                                        metadata=md(keys["viewer"]))
            return d if d.version == 2 else None

        await wait_for_async(switched, 30, "the deployment to follow v2")
        rest = []
        while (chunk := await running_stream.read()) != grpc.aio.EOF:
            rest.append(chunk)
        assert {c.version for c in rest} <= {1} and (rest or [first])[-1].finish_reason
    after = await client(settings, keys["viewer"]).completions.create(
        model="prod", prompt="say moon twice:", max_tokens=4, temperature=0)
    assert after.system_fingerprint == "v2"


async def test_a_deployment_following_an_alias_switches_when_the_alias_moves(stack):
    settings, port, keys, publish = stack
    await publish(ModelAliasMoved(model_name="tiny-lora", alias="champion", version=1))
    deployed = await deploy(port, keys["developer"], "tiny-lora@champion", "champ")
    assert (deployed.version, deployed.follows) == (1, "champion")
    # the registry moves the alias to v2: the deployment follows; removing it leaves v2 served
    await publish(ModelAliasMoved(model_name="tiny-lora", alias="champion", version=2,
                                  previous_version=1))
    channel, svc = stub(port)
    async with channel:
        async def switched():
            d = await svc.GetDeployment(pb.GetDeploymentRequest(name="champ"),
                                        metadata=md(keys["viewer"]))
            return d if d.version == 2 else None

        await wait_for_async(switched, 30, "the deployment to follow champion to v2")
        await publish(ModelAliasMoved(model_name="tiny-lora", alias="champion", version=0,
                                      previous_version=2))
        await publish(ModelStageChanged(ref="tiny-lora-v2", model_name="tiny-lora", version=2,
                                        from_stage="staging", to_stage="production"))
        # (the stage change after it is handled: the removal was handled before it)
        await asyncio.sleep(1.0)
        d = await svc.GetDeployment(pb.GetDeploymentRequest(name="champ"),
                                    metadata=md(keys["viewer"]))
        assert (d.version, d.follows, d.status) == (2, "champion", "ready")
    chunks = await generate(port, keys["viewer"], deployment="champ", prompt="say",
                            max_tokens=2, temperature=0.0)
    assert {c.version for c in chunks} == {2}


async def test_overload_is_429_and_resource_exhausted_never_a_long_queue(stack):
    settings, port, keys, _ = stack
    await deploy(port, keys["developer"], "tiny-lora@1", "busy")
    api = client(settings, keys["viewer"])

    async def one():
        try:
            await api.completions.create(model="busy", prompt="say", max_tokens=48,
                                         temperature=0)
            return "ok"
        except openai.RateLimitError:
            return "429"

    # batch 4 + queue 8 = 12 at most at once: 40 at once must see refusals, and some answers
    outcomes = await asyncio.gather(*(one() for _ in range(40)))
    assert "429" in outcomes and "ok" in outcomes, outcomes


async def test_a_full_fine_tune_serves_as_its_own_model(nats_server, tmp_path, models):
    """A `method: full` version: its checkpoint is every weight, loaded as a model of its own;
    greedy tokens equal transformers generate on the checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, base, _ = models
    spec = JobSpec(base_model=base, dataset="ds-1", method="full",
                   hyperparameters={"max_steps": 2, "batch_size": 4, "learning_rate": 3e-3,
                                    "seed": 1})
    full = train(TrainRequest(spec, ROWS, tmp_path / "full-run")).adapter_dir
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                        serving_http_port=free_port(), model_roots=[root])
    key = LocalArtifactStore(tmp_path / "artifacts").put_dir(
        store_prefix("acme", "job-full", 2), full).rstrip("/")
    developer = await put_api_key(nats_server.url, "developer", "acme")
    bus = Bus(settings, "test")
    await bus.start()
    try:
        await bus.publish(JobSucceeded(
            job_id="job-full", worker_id="w1", model_name="tiny-full",
            spec={"base_model": base, "dataset": "ds-1", "method": "full"}, dataset_id="ds-1",
            dataset_sha256="ab" * 32, dataset_artifacts={}, checkpoint_key=key, adapter_key=key,
            steps=2, final_loss=1.0), tenant="acme")
        await bus.publish(ModelVersionRegistered(
            ref="tiny-full-v1", model_name="tiny-full", version=1, job_id="job-full",
            dataset_sha256="ab" * 32), tenant="acme")
        async with running("serving", build, settings) as port:
            await deploy(port, developer, "tiny-full@1", "full")
            chunks = await generate(port, developer, deployment="full",
                                    prompt="say apple twice:", max_tokens=8, temperature=0.0)
    finally:
        await bus.stop()
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer("say apple twice:").input_ids
    model = AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                             pad_token_id=0)
    assert [t for c in chunks for t in c.token_ids] == out[0, len(ids):].tolist()


async def test_a_deleted_version_generates_nothing_more(stack):
    """The registry deleted v2 (retention): a deployment pinned to it refuses to generate,
    saying why; the others go on."""
    settings, port, keys, publish = stack
    await deploy(port, keys["developer"], "tiny-lora@2", "pinned")
    assert (await generate(port, keys["viewer"], deployment="pinned", prompt="say",
                           max_tokens=2, temperature=0.0))[-1].version == 2
    await publish(ModelVersionDeleted(ref="tiny-lora-v2", model_name="tiny-lora", version=2,
                                      stage="development", reason="superseded"))

    async def refused():
        try:
            await generate(port, keys["viewer"], deployment="pinned", prompt="say", max_tokens=2)
        except grpc.aio.AioRpcError as e:
            return e if e.code() == grpc.StatusCode.FAILED_PRECONDITION else None
        return None

    error = await wait_for_async(refused, 30, "the deleted version to be refused")
    assert "tiny-lora v2 was deleted" in error.details()
    with pytest.raises(openai.ConflictError):
        await client(settings, keys["viewer"]).completions.create(model="pinned", prompt="say")
