"""`llmstudio deploy`, `llmstudio deployments ...` and `llmstudio chat`: serve a registered version
and talk to it (gRPC Generate; the same deployments answer on the OpenAI-compatible API)."""

from __future__ import annotations

import sys

from .common import add_command, add_group, connect, output


def _line(d) -> str:
    what = f"follows {d.model_name}@{d.follows}" if d.follows else f"{d.model_name}@{d.version}"
    serving = f"v{d.version}" if d.version else "no version yet"
    return f"{d.name:<24} {d.status:<8} {what} ({serving})"


def cmd_deploy(args):
    from ..client import to_dict

    c = connect(args)
    d = c.serving.deploy(args.model, args.name)
    output(args, {**to_dict(d), "openai_base_url": c.serving.openai_base_url},
           f"{_line(d)}\nOpenAI-compatible API: {c.serving.openai_base_url} (model \"{d.name}\", "
           "your API key as the bearer token)")


def cmd_list(args):
    from ..client import to_dict

    deployments = connect(args).serving.list(limit=args.limit)
    output(args, [to_dict(d) for d in deployments],
           "\n".join(_line(d) for d in deployments) or "no deployments")


def cmd_delete(args):
    from ..client import to_dict

    d = connect(args).serving.delete(args.name)
    output(args, to_dict(d), f"deleted {d.name}")


def cmd_chat(args):
    """One answer, printed as it is generated (a chat turn; --raw: a plain completion)."""
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    messages = None
    if not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
    chunks = connect(args).serving.generate(
        args.deployment, "" if messages else prompt, messages=messages,
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    text, last = [], None
    for last in chunks:
        text.append(last.text)
        if not args.json:
            print(last.text, end="", flush=True)
    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
             "finish_reason": last.finish_reason, "version": last.version} if last else {}
    if args.json:
        output(args, {"text": "".join(text), **usage})
    else:
        print()


def register(sub) -> None:
    d = add_command(sub, "deploy", cmd_deploy,
                    "serve a model version (gRPC Generate and the OpenAI-compatible API)")
    d.add_argument("model", help="NAME@VERSION, or NAME@STAGE / NAME@ALIAS to follow it "
                   "(e.g. my-model@production: switched when another version is promoted)")
    d.add_argument("--name", default="", help="deployment name, the OpenAI model id "
                   "(default: the model's name)")
    ds = add_group(sub, "deployments", "what is deployed")
    add_command(ds, "list", cmd_list, "list deployments").add_argument(
        "--limit", type=int, default=0, help="at most N (default: all)")
    add_command(ds, "delete", cmd_delete, "stop serving a deployment").add_argument("name")
    c = add_command(sub, "chat", cmd_chat, "ask a deployment; the answer streams as generated")
    c.add_argument("deployment")
    c.add_argument("prompt", nargs="?", help="the message (default: read stdin)")
    c.add_argument("--system", default="", help="a system message first")
    c.add_argument("--raw", action="store_true",
                   help="a plain completion of the prompt, without the chat template")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (default 1.0, the OpenAI default)")
    c.add_argument("--seed", type=int, default=None, help="reproducible sampling")
