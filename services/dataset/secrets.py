"""Provider API keys and tokens in dataset rows, by a maintained rule set: detect-secrets (Yelp).

    find_secrets(text) -> [SecretFinding(kind, start, end), ...]   sorted by start

Each rule is a detect-secrets plugin (its regexes, via `analyze_string`), or a plugin of the same
shape defined here for formats detect-secrets 1.5 lacks, and the finding kind it reports:

    cloud          aws_access_key (AKIA/ASIA/... ids; 40-char secrets assigned near "aws"),
                   azure_storage_key (AccountKey=...), azure_ad_client_secret (...8Q~...),
                   google_api_key (AIza...), gcp_oauth_client_secret (GOCSPX-...),
                   gcp_service_account_key ("private_key_id": "<40 hex>")
    LLM APIs       openai_api_key (...T3BlbkFJ...), anthropic_api_key (sk-ant-api03-...),
                   huggingface_token (hf_..., api_org_...)
    source hosting github_token (ghp_/gho_/ghu_/ghs_/ghr_), github_fine_grained_token
                   (github_pat_), gitlab_token (glpat-, glrt-, GR1348941, ...)
    chat           slack_token (xox?- tokens, hooks.slack.com webhooks), discord_bot_token,
                   discord_webhook, telegram_bot_token (its secret part starts with "A")
    keys           private_key (PEM/OpenSSH/PGP blocks with a body, PuTTY key files), jwt
    services       stripe_key (sk_live_/rk_live_), twilio_api_key (AC/SK + 32), sendgrid_api_key,
                   mailchimp_api_key, square_oauth_secret, artifactory_token, npm_token
                   (npm_..., and .npmrc _authToken), pypi_token

Not used: detect-secrets' keyword and high-entropy plugins (pii.py's assigned-secret rule is
tuned for precision on prose and code), basic auth (pii.py's URL password rule), public IPs
(pii.py's ip_address), and the IBM/Cloudant/SoftLayer rules (an optional-prefix assignment that
would flag any 44-char `key = ...`). Plugins are called through `analyze_string`, never
`analyze_line`: the latter may call the provider's API to verify a key, which a scan of
uploaded data must never do.

Deliberately flagged although they look like ids: "AC"/"SK" + 32 lowercase hex (a Twilio
account SID / API key), 32 hex + "-us<n>" (Mailchimp), a UUID after `:_authToken=` (legacy npm
token) and 40 hex after "private_key_id" (a GCP key file). Bare hashes and UUIDs are not.

A finding's span is where the plugin's value occurs, run on over token characters (a format whose
regex stops early, such as a JWT's signature, is redacted whole); a value glued to letters or
digits on its left is part of a longer string (a base64 blob, a hash), not a key.

Speed: each rule has gates (a literal prefix, or a short shape) that start with a literal
character; per such anchor character, a memchr (`in`) and, if it occurs, one literal-led search
say whether any rule could match; only those rules run their plugin. An ordinary 1 kB row costs
about 2 us; a regex over a set of first characters would cost 10 ns a character.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

from detect_secrets.plugins.artifactory import ArtifactoryDetector
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector


@dataclass(frozen=True)
class SecretFinding:
    kind: str
    start: int
    end: int


# --- formats detect-secrets 1.5 lacks, as plugins of its own shape ------------------------------


class AnthropicKeyDetector(RegexBasedDetector):
    secret_type = "Anthropic API Key"
    denylist = (re.compile(r"sk-ant-(?:api|admin)\d\d-[A-Za-z0-9_-]{80,}"),)


class HuggingFaceTokenDetector(RegexBasedDetector):
    secret_type = "Hugging Face Token"
    denylist = (re.compile(r"(?<![A-Za-z0-9_])(?:hf_|api_org_)[A-Za-z0-9]{34}(?![A-Za-z0-9])"),)


class GoogleApiKeyDetector(RegexBasedDetector):
    secret_type = "Google API Key"
    denylist = (re.compile(r"AIza[0-9A-Za-z_-]{35}"),)


class GcpOAuthClientSecretDetector(RegexBasedDetector):
    secret_type = "GCP OAuth Client Secret"
    denylist = (re.compile(r"GOCSPX-[A-Za-z0-9_-]{28}"),)


class GcpServiceAccountKeyDetector(RegexBasedDetector):
    secret_type = "GCP Service Account Key Id"
    denylist = (re.compile(r"[\"']?private_key_id[\"']?\s*[:=]\s*[\"']([0-9a-f]{40})[\"']"),)


class AzureAdClientSecretDetector(RegexBasedDetector):
    secret_type = "Azure AD Client Secret"
    denylist = (re.compile(r"(?<![A-Za-z0-9_~.])[A-Za-z0-9_~.]{3}\dQ~[A-Za-z0-9_~.-]{31,34}"),)


class GitHubFineGrainedTokenDetector(RegexBasedDetector):
    secret_type = "GitHub Fine-grained Token"
    denylist = (re.compile(r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}"),)


class NpmAccessTokenDetector(RegexBasedDetector):
    secret_type = "npm Access Token"
    denylist = (re.compile(r"npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])"),)


class DiscordWebhookDetector(RegexBasedDetector):
    secret_type = "Discord Webhook"
    denylist = (re.compile(r"https://(?:\w+\.)?discord(?:app)?\.com/api/webhooks/\d+/[\w-]{60,}"),)


# --- spans ---------------------------------------------------------------------------------------

_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def _token_spans(text: str, value: str) -> Iterator[tuple[int, int]]:
    """Each place `value` occurs as a whole token, run on to the token's end."""
    value = value.split(None, 1)[0] if value.strip() else ""  # `.+` rules run on to line end
    if not value:
        return
    at = text.find(value)
    while at != -1:
        end = at + len(value)
        if not (at and text[at - 1] in _ALNUM and value[0] in _ALNUM):
            while end < len(text) and text[end] in _TOKEN_CHARS:
                end += 1
            yield at, end
        at = text.find(value, end)


# A key block with a body (code that names the markers has none); its newlines may be escaped.
_PEM_BLOCK_RE = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:(?:\s|\\[nr])*[A-Za-z-]+:[^\n\\]*)*"
    r"(?:[A-Za-z0-9+/=\s]|\\[nr]){40,}"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----)?"
    r"|---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----[\s\S]*?(?:---- END SSH2 ENCRYPTED PRIVATE KEY"
    r" ----|\Z)"
    r"|PuTTY-User-Key-File-\d:[\s\S]*?(?:Private-MAC: [0-9a-f]+|\Z)"
)


def _private_key_spans(text: str, _marker: str) -> Iterator[tuple[int, int]]:
    for match in _PEM_BLOCK_RE.finditer(text):
        yield match.start(), match.end()


@dataclass(frozen=True)
class SecretRule:
    kind: str
    detector: BasePlugin
    # Regexes one of which every match of the plugin holds: rows with none skip the plugin. Each
    # starts with a literal character (its anchor), the rest in a lookbehind or lookahead.
    gates: tuple[str, ...]
    spans: Callable[[str, str], Iterator[tuple[int, int]]] = _token_spans

    @cached_property
    def gate_re(self) -> re.Pattern:
        return re.compile("|".join(self.gates))


RULES = (
    SecretRule("aws_access_key", AWSKeyDetector(),
               (r"A(?:KIA|SIA|BIA|CCA|3T)", "aws", "AWS", "Aws")),
    SecretRule("azure_storage_key", AzureStorageKeyDetector(), ("AccountKey=",)),
    SecretRule("azure_ad_client_secret", AzureAdClientSecretDetector(), (r"Q(?<=\dQ)~",)),
    SecretRule("google_api_key", GoogleApiKeyDetector(), ("AIza",)),
    SecretRule("gcp_oauth_client_secret", GcpOAuthClientSecretDetector(), ("GOCSPX-",)),
    SecretRule("gcp_service_account_key", GcpServiceAccountKeyDetector(),
               (r"_(?<=private_)key_id",)),
    SecretRule("openai_api_key", OpenAIDetector(), ("T3BlbkFJ",)),
    SecretRule("anthropic_api_key", AnthropicKeyDetector(), (r"-(?<=sk-)ant-",)),
    SecretRule("huggingface_token", HuggingFaceTokenDetector(), (r"_(?<=hf_)", r"_(?<=api_)org_")),
    SecretRule("github_token", GitHubTokenDetector(), (r"_(?<=gh[pousr]_)",)),
    SecretRule("github_fine_grained_token", GitHubFineGrainedTokenDetector(),
               (r"_(?<=github_)pat_",)),
    SecretRule("gitlab_token", GitLabTokenDetector(),
               (r"-(?<=gl(?:dt|ft|rt)-)", r"-(?<=gl(?:pat|cbt|imt|ptt|oas)-)", r"-(?<=glsoat-)",
                r"-(?<=glagent-)", "GR1348941")),
    SecretRule("slack_token", SlackDetector(),
               (r"-(?<=[xX][oO][xX][abposrABPOSR]-)", r"\.(?<=hooks\.)slack\.com")),
    SecretRule("discord_bot_token", DiscordBotTokenDetector(), (r"\.(?=[\w-]{6}\.[\w-]{27})",)),
    SecretRule("discord_webhook", DiscordWebhookDetector(), ("/api/webhooks/",)),
    SecretRule("telegram_bot_token", TelegramBotTokenDetector(), (r":(?=A[\w-]{34})",)),
    SecretRule("private_key", PrivateKeyDetector(), ("PRIVATE KEY", "PuTTY-User-Key-File-"),
               _private_key_spans),
    SecretRule("jwt", JwtTokenDetector(), (r"J(?<=eyJ)",)),
    SecretRule("stripe_key", StripeDetector(), (r"_(?<=[rs]k_)live_",)),
    SecretRule("twilio_api_key", TwilioKeyDetector(),
               (r"AC(?=[a-z0-9]{32})", r"SK(?=[a-z0-9]{32})")),
    SecretRule("sendgrid_api_key", SendGridDetector(), (r"SG\.",)),
    SecretRule("mailchimp_api_key", MailchimpDetector(), (r"-us\d",)),
    SecretRule("square_oauth_secret", SquareOAuthDetector(), (r"-(?<=sq0csp-)",)),
    SecretRule("artifactory_token", ArtifactoryDetector(), ("AKC", r"AP[\dA-F]")),
    SecretRule("npm_token", NpmDetector(), (":_authToken=",)),
    SecretRule("npm_token", NpmAccessTokenDetector(), (r"_(?<=npm_)",)),
    SecretRule("pypi_token", PypiTokenDetector(), (r"-(?<=pypi-)AgE",)),
)
SECRET_KINDS = tuple(dict.fromkeys(rule.kind for rule in RULES))


def _anchor_groups() -> tuple[tuple[str, re.Pattern, tuple[int, ...]], ...]:
    """(anchor character, its gates joined, the rules they open), one per anchor character."""
    gates: dict[str, list[str]] = {}
    rules: dict[str, list[int]] = {}
    for index, rule in enumerate(RULES):
        for gate in rule.gates:
            anchor = gate[1] if gate[0] == "\\" else gate[0]
            gates.setdefault(anchor, []).append(gate)
            rules.setdefault(anchor, []).append(index)
    return tuple((anchor, re.compile("|".join(gates[anchor])), tuple(dict.fromkeys(rules[anchor])))
                 for anchor in gates)


# `anchor in text` is a memchr; a regex that starts with a literal is a fast search too
_ANCHOR_GROUPS = _anchor_groups()


def find_secrets(text: str) -> list[SecretFinding]:
    opened = [rules for anchor, gate_re, rules in _ANCHOR_GROUPS
              if anchor in text and gate_re.search(text)]
    if not opened:
        return []
    found: set[SecretFinding] = set()
    for index in sorted({index for rules in opened for index in rules}):
        rule = RULES[index]
        if rule.gate_re.search(text) is None:
            continue
        for value in set(rule.detector.analyze_string(text)):
            found.update(SecretFinding(rule.kind, start, end)
                         for start, end in rule.spans(text, value))
    return sorted(found, key=lambda f: (f.start, -f.end, f.kind))
