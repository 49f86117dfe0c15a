"""The tenant-bounded key layout: every tenant's artifacts under `tenants/<tenant>/`, and a key
from an event or a request accepted only under its own tenant's prefix."""

from __future__ import annotations

import pytest

from llmstudio.artifactkeys import InvalidKey, check_tenant_key, tenant_key
from llmstudio.bus import Refused, refuse_foreign_keys
from llmstudio.storage import LocalArtifactStore


def test_tenant_key_is_under_the_tenants_prefix_and_refuses_escapes():
    assert tenant_key("acme", "jobs", "j1") == "tenants/acme/jobs/j1"
    for tenant in ("..", ".", "", "a/b"):
        with pytest.raises(InvalidKey, match="cannot be a key segment"):
            tenant_key(tenant, "jobs", "j1")
        with pytest.raises(InvalidKey, match="cannot be a key segment"):
            check_tenant_key("tenants/a/b/jobs/j1", tenant)


@pytest.mark.parametrize("key", [
    "tenants/globex/jobs/j1/checkpoint-8",   # another tenant
    "tenants/acme-evil/jobs/j1",             # a tenant whose name starts like acme's
    "tenants/acme",                           # the prefix itself, not under it
    "jobs/j1/checkpoint-8",                   # the layout before tenants: no tenant at all
    "tenants/acme/../globex/jobs/j1",         # an escape
    "/tenants/acme/jobs/j1",                  # absolute
])
def test_only_keys_under_the_tenants_own_prefix_pass(key):
    with pytest.raises(InvalidKey):
        check_tenant_key(key, "acme")
    with pytest.raises(Refused, match=r"^security: "):
        refuse_foreign_keys("acme", "tenants/acme/ok", key)


def test_own_keys_and_empty_ones_pass():
    assert check_tenant_key("tenants/acme/jobs/j1/", "acme") == "tenants/acme/jobs/j1/"
    refuse_foreign_keys("acme", "tenants/acme/jobs/j1/checkpoint-8", "")


def test_blobs_go_under_the_prefix_asked(tmp_path):
    store = LocalArtifactStore(tmp_path)
    key = store.put_blob(b"rows", "tenants/acme/datasets/raw")
    assert key.startswith("tenants/acme/datasets/raw/") and len(key.rsplit("/", 1)[1]) == 64
    assert store.put_blob(b"rows", "tenants/globex/datasets/raw/") != key  # stored per tenant
    assert store.get_bytes(key) == b"rows"
