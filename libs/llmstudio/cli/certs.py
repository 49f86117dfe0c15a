"""`llmstudio certs [DIR]`: a deployment's TLS certificates (llmstudio.tls)."""

from __future__ import annotations

from pathlib import Path

from .common import add_command, output


def cmd_certs(args):
    from ..tls import CA_KEY_FILE, DEFAULT_NAMESPACE, write_certs

    directory = Path(args.dir)
    made = write_certs(directory, hosts=args.hosts, namespace=args.namespace or DEFAULT_NAMESPACE,
                       force=args.force)
    servers = ", ".join(name for name in made if name != "ca")
    output(args, {k: str(v) for k, v in made.items()},
           f"wrote a dev CA ({made['ca']}; its key in {directory / CA_KEY_FILE}, kept out of the "
           f"secrets) and a server certificate and key for {servers} under {directory}\n"
           f"(mount them as secrets; clients and the CLI trust {made['ca']}: --ca-file or "
           "LLMSTUDIO_TLS_CA_FILE)")


def register(sub) -> None:
    c = add_command(sub, "certs", cmd_certs,
                    "make a deployment's TLS certificates (compose, k8s): a dev CA and a server "
                    "certificate per service and for nats-server, naming their compose and k8s "
                    "hosts; existing ones are kept")
    c.add_argument("dir", nargs="?", default="deploy/secrets/tls",
                   help="where (default deploy/secrets/tls)")
    c.add_argument("--hosts", nargs="+", default=[], metavar="HOST",
                   help="more names or addresses every server certificate names (e.g. the host "
                   "clients reach the published ports at)")
    c.add_argument("--namespace", default=None,
                   help="the k8s namespace whose Service names they carry (default llmstudio)")
    c.add_argument("--force", action="store_true",
                   help="make everything anew (a new CA: every client needs the new ca.crt)")
