"""The Python SDK: every operation of the CLI, for Python code.

    from llmstudio.client import Client
    c = Client()                      # finds the embedded stack, or LLMSTUDIO_* settings
    ds = c.datasets.push("data.jsonl", name="reverse")
    job = c.jobs.create({"base_model": "...", "dataset": ds.id})
    for update in c.jobs.watch(job.id): ...

Calls return protobuf messages (`to_dict` turns any into plain JSON-able data) and raise
`grpc.RpcError` with the service's status code and a message naming what is wrong.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format, struct_pb2

from .config import Settings
from .grpcutil import channel
from .local import admin_key, running_stack
from .paging import MAX_PAGE_SIZE
from .v1 import (
    datasets_pb2,
    datasets_pb2_grpc,
    evaluation_pb2,
    evaluation_pb2_grpc,
    governance_pb2,
    governance_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    serving_pb2,
    serving_pb2_grpc,
)

TERMINAL_JOB_STATUSES = {
    jobs_pb2.JOB_STATUS_SUCCEEDED, jobs_pb2.JOB_STATUS_FAILED, jobs_pb2.JOB_STATUS_CANCELLED,
}
DEFAULT_TIMEOUT = 30.0


def to_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def job_status_name(status: int) -> str:
    return jobs_pb2.JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()


def stage_name(stage: int) -> str:
    return registry_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()


def parse_stage(name: str) -> int:
    try:
        return registry_pb2.Stage.Value("STAGE_" + name.upper())
    except ValueError:
        raise ValueError(
            f"unknown stage {name!r}: use development, staging, production or archived"
        ) from None


class _Api:
    def __init__(self, client: Client, service: str, stub_cls):
        self._client = client
        self._stub = stub_cls(client.channel(service))
        self._timeout = client.timeout


UPLOAD_CHUNK_BYTES = 1 << 20  # each chunk one message, well under the servers' 4 MiB limit


def _every_page(call, request, field: str, limit: int, timeout: float | None) -> list:
    """The items of a listing, page after page (each call bounded by `timeout`): all of
    them, or the first `limit` when > 0."""
    items: list = []
    while True:
        request.page_size = min(MAX_PAGE_SIZE, limit - len(items)) if limit else MAX_PAGE_SIZE
        response = call(request, timeout=timeout)
        items.extend(getattr(response, field))
        if not response.next_page_token or (limit and len(items) >= limit):
            return items
        request.page_token = response.next_page_token


def dataset_options(name: str = "", *, filename: str = "", validation_fraction: float = 0.0,
                    test_fraction: float = 0.0, seed: int = 0, file_format: str = "",
                    schema: str = "", column_map: dict[str, str] | None = None,
                    source_split: str = "",
                    max_invalid_fraction: float | None = None,
                    max_duplicate_fraction: float | None = None,
                    max_pii_fraction: float | None = None, remove_duplicates: bool = False,
                    remove_near_duplicates: bool = False, redact_pii: bool = False,
                    base_model: str = "", max_length: int = 0, description: str = "",
                    idempotency_key: str = "") -> datasets_pb2.CreateDatasetRequest:
    """The options of an upload or import (see DatasetService in proto/llmstudio/v1)."""
    policy = datasets_pb2.ValidationPolicy()
    for field, value in (("max_invalid_fraction", max_invalid_fraction),
                         ("max_duplicate_fraction", max_duplicate_fraction),
                         ("max_pii_fraction", max_pii_fraction)):
        if value is not None:
            setattr(policy, field, value)
    return datasets_pb2.CreateDatasetRequest(
        name=name, filename=filename, validation_fraction=validation_fraction,
        test_fraction=test_fraction, seed=seed, file_format=file_format, schema=schema,
        column_map=column_map or {}, source_split=source_split, policy=policy,
        quality=datasets_pb2.QualityOptions(remove_duplicates=remove_duplicates,
                                            remove_near_duplicates=remove_near_duplicates,
                                            redact_pii=redact_pii),
        base_model=base_model, max_length=max_length, description=description,
        idempotency_key=idempotency_key,
    )


def _default_name(path: Path) -> str:
    """data.jsonl.gz -> data; a datasets folder -> its name."""
    name = path.name
    while "." in name and not path.is_dir():
        name = name.rsplit(".", 1)[0]
    return name


class Datasets(_Api):
    def push(self, path: str | Path, name: str = "", *, on_progress=None,
             **options) -> datasets_pb2.Dataset:
        """Upload a file (or a `datasets` save_to_disk folder, sent as a tar stream) in 1 MiB
        chunks: the file never sits in memory on either side. `options`: see dataset_options.
        `on_progress(bytes_sent, total_bytes)` is called after every chunk."""
        path = Path(path)
        header = dataset_options(name or _default_name(path), filename=path.name, **options)
        if path.is_dir():
            return self._push_folder(path, header, on_progress)
        return self._push_file(path, header, on_progress)

    def _push_file(self, path: Path, header, on_progress) -> datasets_pb2.Dataset:
        total = path.stat().st_size

        def chunks():
            yield datasets_pb2.UploadDatasetChunk(options=header)
            sent = 0
            with path.open("rb") as f:
                while data := f.read(UPLOAD_CHUNK_BYTES):
                    sent += len(data)
                    yield datasets_pb2.UploadDatasetChunk(data=data)
                    if on_progress:
                        on_progress(sent, total)

        return self._stub.UploadDataset(chunks(), timeout=None)

    def _push_folder(self, path: Path, header, on_progress) -> datasets_pb2.Dataset:
        import tarfile
        import tempfile

        # A datasets folder is a few arrow files: send them as one (uncompressed) tar stream.
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / (path.name + ".tar")
            with tarfile.open(archive, mode="w") as tar:
                tar.add(path, arcname=path.name)
            header.filename = archive.name
            return self._push_file(archive, header, on_progress)

    def import_uri(self, source_uri: str, name: str = "", **options) -> datasets_pb2.Dataset:
        """Import s3://bucket/key (allowed buckets) or a server path (under allowed roots)."""
        name = name or _default_name(Path(source_uri.rstrip("/")))
        return self._stub.ImportDataset(datasets_pb2.ImportDatasetRequest(
            options=dataset_options(name, **options), source_uri=source_uri), timeout=None)

    def derive(self, parent_id: str, name: str = "", *, remove_duplicates: bool = False,
               remove_near_duplicates: bool = False, redact_pii: bool = False,
               resplit: bool = False, validation_fraction: float = 0.0,
               test_fraction: float = 0.0, seed: int = 0, description: str = "",
               idempotency_key: str = "") -> datasets_pb2.Dataset:
        return self._stub.DeriveDataset(datasets_pb2.DeriveDatasetRequest(
            parent_id=parent_id, name=name,
            quality=datasets_pb2.QualityOptions(remove_duplicates=remove_duplicates,
                                                remove_near_duplicates=remove_near_duplicates,
                                                redact_pii=redact_pii),
            resplit=resplit, validation_fraction=validation_fraction,
            test_fraction=test_fraction, seed=seed, description=description,
            idempotency_key=idempotency_key), timeout=None)

    def get(self, dataset_id: str) -> datasets_pb2.Dataset:
        return self._stub.GetDataset(datasets_pb2.GetDatasetRequest(id=dataset_id),
                                     timeout=self._timeout)

    def list(self, name: str = "", limit: int = 0) -> list[datasets_pb2.Dataset]:
        """Every version (of one name), by name then version; the first `limit` if > 0."""
        return _every_page(self._stub.ListDatasets, datasets_pb2.ListDatasetsRequest(name=name),
                           "datasets", limit, self._timeout)

    def report(self, dataset_id: str) -> datasets_pb2.DatasetReport:
        return self._stub.GetDatasetReport(datasets_pb2.GetDatasetReportRequest(id=dataset_id),
                                           timeout=self._timeout)

    def preview(self, dataset_id: str, base_model: str, *, split: str = "", offset: int = 0,
                limit: int = 0, max_length: int = 0) -> datasets_pb2.PreviewDatasetResponse:
        return self._stub.PreviewDataset(datasets_pb2.PreviewDatasetRequest(
            id=dataset_id, base_model=base_model, split=split, offset=offset, limit=limit,
            max_length=max_length), timeout=None)


class Jobs(_Api):
    def create(self, spec: dict, priority_class: str = "normal",
               idempotency_key: str = "") -> jobs_pb2.Job:
        """Submit a job; `priority_class`: low, normal, high (developers), urgent (admins).
        Without an `idempotency_key` one is made, so a retried call (a scheduler replica gone
        mid-call) creates one job."""
        struct = struct_pb2.Struct()
        struct.update(spec)
        return self._stub.CreateJob(jobs_pb2.CreateJobRequest(
            spec=struct, priority_class=priority_class,
            idempotency_key=idempotency_key or uuid.uuid4().hex), timeout=self._timeout)

    def get(self, job_id: str) -> jobs_pb2.Job:
        return self._stub.GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=self._timeout)

    def list(self, status: str = "", limit: int = 0) -> list[jobs_pb2.Job]:
        """Every job (of one status), newest first; the first `limit` if > 0."""
        code = jobs_pb2.JobStatus.Value("JOB_STATUS_" + status.upper()) if status else 0
        return _every_page(self._stub.ListJobs, jobs_pb2.ListJobsRequest(status=code),  # type: ignore[arg-type]
                           "jobs", limit, self._timeout)

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self._stub.CancelJob(jobs_pb2.CancelJobRequest(id=job_id), timeout=self._timeout)

    def pause(self, job_id: str) -> jobs_pb2.Job:
        """Checkpoint and hand back a running job (paused once it is); keep a queued one out of
        placement. It keeps its place in the queue."""
        return self._stub.PauseJob(jobs_pb2.PauseJobRequest(id=job_id), timeout=self._timeout)

    def resume(self, job_id: str) -> jobs_pb2.Job:
        return self._stub.ResumeJob(jobs_pb2.ResumeJobRequest(id=job_id), timeout=self._timeout)

    def set_quota(self, tenant: str = "", *, max_running: int = 0, max_queued: int = 0,
                  max_gpus: int = 0, max_cpu_slots: int = 0,
                  weight: float = 1.0) -> jobs_pb2.Quota:
        """A tenant's quota (0: no limit) and fair-share weight (admins; default tenant: yours)."""
        quota = jobs_pb2.Quota(tenant=tenant, max_running=max_running, max_queued=max_queued,
                               max_gpus=max_gpus, max_cpu_slots=max_cpu_slots, weight=weight)
        return self._stub.SetQuota(jobs_pb2.SetQuotaRequest(quota=quota), timeout=self._timeout)

    def get_quota(self, tenant: str = "") -> jobs_pb2.Quota:
        return self._stub.GetQuota(jobs_pb2.GetQuotaRequest(tenant=tenant),
                                   timeout=self._timeout)

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[jobs_pb2.JobUpdate]:
        """Current state, then every status change, metric sample and checkpoint, until done."""
        yield from self._stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=timeout)


class ArtifactDownloadError(ValueError):
    """A downloaded artifact file that is not what the server announced, or whose path would
    land outside the destination folder."""


def artifact_destination(dest_dir: Path, rel: str) -> Path:
    """Where the artifact file `rel` goes under `dest_dir`; refuses a path that would escape it
    (absolute, '..', backslashes, or through a symlink already there)."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel
            or any(p in ("", ".", "..") for p in parts)):
        raise ArtifactDownloadError(
            f"refusing artifact file path {rel!r}: it must be relative, without '.', '..' or "
            f"empty segments, inside {dest_dir}")
    root = dest_dir.resolve()
    dest = root.joinpath(*parts)
    if not dest.resolve().is_relative_to(root):
        raise ArtifactDownloadError(f"refusing artifact file path {rel!r}: escapes {dest_dir}")
    return dest


class _ArtifactFileWriter:
    """One file of a download: written to a temp file beside its destination, checked against
    the size and sha256 its first chunk announced, then renamed into place."""

    def __init__(self, dest_dir: Path, first: registry_pb2.ArtifactChunk):
        self.rel, self.size, self.sha256 = first.path, first.size, first.sha256
        self.dest = artifact_destination(dest_dir, first.path)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.",
                                   suffix=".part")
        self.tmp, self.file = Path(tmp), os.fdopen(fd, "wb")
        self.digest, self.written = hashlib.sha256(), 0
        self.write(first.data)

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.size:
            raise ArtifactDownloadError(
                f"{self.rel}: more than the announced {self.size} bytes")
        self.digest.update(data)
        self.file.write(data)

    def finish(self) -> None:
        self.file.close()
        got = (self.written, self.digest.hexdigest())
        if got != (self.size, self.sha256):
            raise ArtifactDownloadError(
                f"{self.rel}: got {got[0]} bytes with sha256 {got[1]}, the server announced "
                f"{self.size} bytes with sha256 {self.sha256}")
        os.replace(self.tmp, self.dest)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class Models(_Api):
    def list(self, limit: int = 0) -> list[registry_pb2.Model]:
        """Every model with its versions, by name; the first `limit` if > 0."""
        return _every_page(self._stub.ListModels, registry_pb2.ListModelsRequest(), "models",
                           limit, self._timeout)

    def get(self, name: str) -> registry_pb2.Model:
        return self._stub.GetModel(registry_pb2.GetModelRequest(name=name), timeout=self._timeout)

    def get_version(self, name: str, version: int = 0,
                    alias: str = "") -> registry_pb2.ModelVersion:
        """A version by number (0: the latest), or the one `alias` names."""
        return self._stub.GetVersion(registry_pb2.GetVersionRequest(
            model_name=name, version=version, alias=alias), timeout=self._timeout)

    def set_alias(self, name: str, alias: str, version: int) -> registry_pb2.Model:
        """Point `alias` (champion, candidate, ...) at a version; moving it is audited."""
        return self._stub.SetAlias(registry_pb2.SetAliasRequest(
            model_name=name, alias=alias, version=version), timeout=self._timeout)

    def delete_alias(self, name: str, alias: str) -> registry_pb2.Model:
        return self._stub.DeleteAlias(registry_pb2.DeleteAliasRequest(
            model_name=name, alias=alias), timeout=self._timeout)

    def update(self, name: str, description: str | None = None,
               set_tags: dict[str, str] | None = None,
               remove_tags: Sequence[str] | None = None) -> registry_pb2.Model:
        """A model's description (None: unchanged) and tags (set these, remove those)."""
        return self._stub.UpdateModel(registry_pb2.UpdateModelRequest(
            name=name, description=description, set_tags=set_tags or {},
            remove_tags=remove_tags or []), timeout=self._timeout)

    def update_version(self, name: str, version: int, description: str | None = None,
                       set_tags: dict[str, str] | None = None,
                       remove_tags: Sequence[str] | None = None) -> registry_pb2.ModelVersion:
        """A version's description (None: unchanged) and tags (set these, remove those)."""
        return self._stub.UpdateVersion(registry_pb2.UpdateVersionRequest(
            model_name=name, version=version, description=description,
            set_tags=set_tags or {}, remove_tags=remove_tags or []), timeout=self._timeout)

    def compare(self, name: str, a: int, b: int) -> registry_pb2.VersionComparison:
        """Versions `a` and `b` side by side: metric deltas (with the evaluation's intervals),
        differing hyperparameters, training data."""
        return self._stub.CompareVersions(registry_pb2.CompareVersionsRequest(
            model_name=name, a=a, b=b), timeout=self._timeout)

    def model_card(self, name: str, version: int = 0) -> registry_pb2.ModelCard:
        """The version's model card (Markdown), as the registry stores it now."""
        return self._stub.GetModelCard(registry_pb2.GetModelCardRequest(
            model_name=name, version=version), timeout=self._timeout)

    def delete_version(self, name: str, version: int,
                       reason: str = "") -> registry_pb2.ModelVersion:
        """Delete a version (not in production, named by no alias): hidden, its record kept."""
        return self._stub.DeleteVersion(registry_pb2.DeleteVersionRequest(
            model_name=name, version=version, reason=reason), timeout=self._timeout)

    def set_stage(self, name: str, version: int, stage: str) -> registry_pb2.ModelVersion:
        return self._stub.SetStage(registry_pb2.SetStageRequest(
            model_name=name, version=version, stage=parse_stage(stage)),  # type: ignore[arg-type]
            timeout=self._timeout)

    def request_promotion(self, name: str, version: int, stage: str, justification: str = "",
                          idempotency_key: str = "") -> registry_pb2.PromotionRecord:
        """Ask to move a version to `stage` under the tenant's policy; governance decides
        (`client.governance.promotion_request(id)`), a reviewer approves, the registry moves it."""
        return self._stub.RequestPromotion(registry_pb2.RequestPromotionRequest(
            model_name=name, version=version, stage=parse_stage(stage),  # type: ignore[arg-type]
            justification=justification, idempotency_key=idempotency_key),
            timeout=self._timeout)

    def promotion(self, request_id: str) -> registry_pb2.PromotionRecord:
        """The registry's record of a request: "applied" once it moved the version."""
        return self._stub.GetPromotion(registry_pb2.GetPromotionRecordRequest(
            request_id=request_id), timeout=self._timeout)

    def download(self, name: str, version: int, dest_dir: str | Path,
                 artifact: str = "checkpoint") -> Path:
        """Write the files of a version's artifact ("checkpoint" or "adapter") under
        `dest_dir`, each checked against the size and sha256 the registry sends; a file that
        does not match is not left behind. Needs no artifact store settings."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        stream = self._stub.DownloadArtifact(registry_pb2.DownloadArtifactRequest(
            model_name=name, version=version, artifact=artifact), timeout=None)
        writer: _ArtifactFileWriter | None = None
        try:
            for chunk in stream:
                if chunk.path:
                    if writer is not None:
                        writer.finish()
                    writer = _ArtifactFileWriter(dest, chunk)
                elif writer is None:
                    raise ArtifactDownloadError("the first chunk of the download names no file")
                else:
                    writer.write(chunk.data)
            if writer is not None:
                writer.finish()
        except BaseException:
            if writer is not None:
                writer.discard()
            stream.cancel()
            raise
        return dest


class Evaluations(_Api):
    def list(self, job_id: str = "", limit: int = 0) -> list[evaluation_pb2.Evaluation]:
        """Every evaluation (of one job), oldest first; the first `limit` if > 0."""
        return _every_page(self._stub.ListEvaluations,
                           evaluation_pb2.ListEvaluationsRequest(job_id=job_id), "evaluations",
                           limit, self._timeout)

    def get(self, evaluation_id: str) -> evaluation_pb2.Evaluation:
        return self._stub.GetEvaluation(evaluation_pb2.GetEvaluationRequest(id=evaluation_id),
                                        timeout=self._timeout)

    def create(self, *, dataset_id: str, model_name: str = "", version: int = 0,
               base_model: str = "", split: str = "", suite: str = "",
               metrics: Sequence[str] = (), tasks: Sequence[dict] = (), max_samples: int = 0,
               max_new_tokens: int = 0, bootstrap_samples: int = 0, seed: int = 0,
               idempotency_key: str = "") -> evaluation_pb2.Evaluation:
        """Evaluate `model_name@version` (its base vs its fine-tune) or `base_model` alone on a
        dataset version's split with a suite, extra metrics and task files; it runs in the
        background (status running until done: poll `get`). A retry with the same
        `idempotency_key` returns the same evaluation (one is made when not given)."""
        return self._stub.CreateEvaluation(evaluation_pb2.CreateEvaluationRequest(
            model_name=model_name, version=version, base_model=base_model,
            dataset_id=dataset_id, split=split, suite=suite, metrics=list(metrics),
            tasks=[evaluation_pb2.TaskFile(**t) for t in tasks], max_samples=max_samples,
            max_new_tokens=max_new_tokens, bootstrap_samples=bootstrap_samples, seed=seed,
            idempotency_key=idempotency_key or uuid.uuid4().hex), timeout=self._timeout)


class Serving(_Api):
    def deploy(self, model: str, name: str = "") -> serving_pb2.Deployment:
        """Deploy `NAME@VERSION` (that version), `NAME@STAGE` or `NAME@ALIAS` (whichever version
        is in the stage or named by the alias, followed as it changes) as `name` (default: the
        model's name)."""
        return self._stub.CreateDeployment(
            serving_pb2.CreateDeploymentRequest(model=model, name=name), timeout=self._timeout)

    def get(self, name: str) -> serving_pb2.Deployment:
        return self._stub.GetDeployment(serving_pb2.GetDeploymentRequest(name=name),
                                        timeout=self._timeout)

    def list(self, limit: int = 0) -> list[serving_pb2.Deployment]:
        return _every_page(self._stub.ListDeployments, serving_pb2.ListDeploymentsRequest(),
                           "deployments", limit, self._timeout)

    def delete(self, name: str) -> serving_pb2.Deployment:
        return self._stub.DeleteDeployment(serving_pb2.DeleteDeploymentRequest(name=name),
                                           timeout=self._timeout)

    def generate(self, deployment: str, prompt: str = "", *,
                 messages: Sequence[dict[str, str]] = (), max_tokens: int = 0,
                 temperature: float | None = None, top_p: float | None = None,
                 stop: tuple[str, ...] = (), seed: int | None = None,
                 ) -> Iterator[serving_pb2.GenerateChunk]:
        """The deployment's answer as it is generated (chunks; the last has finish_reason and
        the usage counts): to `prompt`, or to chat `messages` through the chat template."""
        request = serving_pb2.GenerateRequest(
            deployment=deployment, prompt=prompt, max_tokens=max_tokens, stop=list(stop),
            messages=[serving_pb2.ChatMessage(**m) for m in messages])
        for field, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
            if value is not None:
                setattr(request, field, value)
        return self._stub.Generate(request, timeout=None)

    @property
    def openai_base_url(self) -> str:
        """The OpenAI-compatible API's base URL, for `openai.OpenAI(base_url=..., api_key=...)`."""
        stack = self._client.stack
        url = stack.serving_http_url if stack and "serving" in stack.services else ""
        return (url or self._client.settings.serving_http_url).rstrip("/") + "/v1"


class Governance(_Api):
    def create_key(self, role: str, tenant: str = "", name: str = ""):
        return self._stub.CreateApiKey(governance_pb2.CreateApiKeyRequest(
            role=role, tenant=tenant, name=name), timeout=self._timeout)

    def revoke_key(self, key_id: str) -> bool:
        return self._stub.RevokeApiKey(governance_pb2.RevokeApiKeyRequest(key_id=key_id),
                                       timeout=self._timeout).revoked

    def whoami(self):
        return self._stub.WhoAmI(governance_pb2.WhoAmIRequest(), timeout=self._timeout)

    def query_audit(self, event_type_prefix: str = "", subject: str = "",
                    after_sequence: int = 0, limit: int = 0):
        return list(self._stub.QueryAudit(governance_pb2.QueryAuditRequest(
            event_type_prefix=event_type_prefix, subject=subject,
            after_sequence=after_sequence, limit=limit), timeout=self._timeout).records)

    def verify_audit(self) -> governance_pb2.VerifyAuditResponse:
        return self._stub.VerifyAudit(governance_pb2.VerifyAuditRequest(), timeout=self._timeout)

    # -- promotion policies and requests --------------------------------------------------------
    def set_policy(self, yaml_text: str, tenant: str = "") -> governance_pb2.Policy:
        """A new version of the tenant's promotion policy (admin)."""
        return self._stub.SetPolicy(governance_pb2.SetPolicyRequest(yaml=yaml_text,
                                                                    tenant=tenant),
                                    timeout=self._timeout)

    def get_policy(self, version: int = 0, tenant: str = "") -> governance_pb2.Policy:
        """The policy in force (or `version`); version 0 is the built-in default."""
        return self._stub.GetPolicy(governance_pb2.GetPolicyRequest(version=version,
                                                                    tenant=tenant),
                                    timeout=self._timeout)

    def policy_history(self, tenant: str = "") -> list[governance_pb2.Policy]:
        return list(self._stub.PolicyHistory(governance_pb2.PolicyHistoryRequest(tenant=tenant),
                                             timeout=self._timeout).policies)

    def promotion_requests(self, status: str = "", tenant: str = "",
                           limit: int = 0) -> list[governance_pb2.PromotionRequest]:
        return list(self._stub.ListPromotionRequests(governance_pb2.ListPromotionRequestsRequest(
            status=status, tenant=tenant, limit=limit), timeout=self._timeout).requests)

    def promotion_request(self, request_id: str) -> governance_pb2.PromotionRequest:
        return self._stub.GetPromotionRequest(governance_pb2.GetPromotionRequestRequest(
            request_id=request_id), timeout=self._timeout)

    def approve(self, request_id: str, comment: str = "") -> governance_pb2.PromotionRequest:
        """Approve a promotion request (a reviewer or admin other than its requester)."""
        return self._stub.Approve(governance_pb2.ApproveRequest(
            request_id=request_id, comment=comment), timeout=self._timeout)

    def reject(self, request_id: str, reason: str) -> governance_pb2.PromotionRequest:
        return self._stub.Reject(governance_pb2.RejectRequest(
            request_id=request_id, reason=reason), timeout=self._timeout)

    # -- lineage ---------------------------------------------------------------------------------
    def lineage(self, model_name: str, version: int, tenant: str = "",
                prov: bool = False) -> governance_pb2.LineageGraph:
        """The version's lineage graph (datasets -> job, attempts -> checkpoints -> evaluations
        -> version -> promotion requests, approvals, stage changes), from the audit log; with
        `prov`, also as W3C PROV-JSON (`.prov_json`)."""
        return self._stub.GetLineage(governance_pb2.GetLineageRequest(
            model_name=model_name, version=version, tenant=tenant, prov=prov),
            timeout=self._timeout)


class Client:
    """Connects to each service; addresses from the running embedded stack or from Settings."""

    def __init__(self, api_key: str | None = None, settings: Settings | None = None,
                 data_dir: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
                 ca_file: str | Path | None = None):
        self.settings = settings or Settings()
        # TLS to the services of a deployment (llmstudio.tls): the CA that signed them
        ca = ca_file or self.settings.tls_ca_file
        self.ca_file = Path(ca) if ca else None
        self.data_dir = Path(data_dir or self.settings.data_dir)
        self.stack = running_stack(self.data_dir)
        key = api_key or os.environ.get("LLMSTUDIO_API_KEY") or self.settings.api_key
        if not key and self.stack:
            key = admin_key(self.data_dir)
        self.api_key = key or ""
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}
        self.datasets = Datasets(self, "dataset", datasets_pb2_grpc.DatasetServiceStub)
        self.jobs = Jobs(self, "scheduler", jobs_pb2_grpc.JobServiceStub)
        self.models = Models(self, "registry", registry_pb2_grpc.RegistryServiceStub)
        self.evaluations = Evaluations(
            self, "evaluator", evaluation_pb2_grpc.EvaluationServiceStub)
        self.governance = Governance(self, "governance", governance_pb2_grpc.GovernanceServiceStub)
        self.serving = Serving(self, "serving", serving_pb2_grpc.ServingServiceStub)

    def addr(self, service: str) -> str:
        if self.stack and service in self.stack.services:
            return self.stack.addr(service)
        return self.settings.addr(service)

    def channel(self, service: str):
        if service not in self._channels:
            # the embedded stack serves plaintext on loopback; a deployment, TLS given a CA
            embedded = bool(self.stack and service in self.stack.services)
            self._channels[service] = channel(self.addr(service), self.api_key,
                                              None if embedded else self.ca_file)
        return self._channels[service]

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
