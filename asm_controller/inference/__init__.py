"""ASM's inference endpoint (section 7 of asm_extensions.md): CLI providers as OpenAI chat completions.

* :func:`inference_router` -- the FastAPI routes (``/v1/chat/completions``, ``/v1/models``, and the
  per-lease ``/leases/<ref>/...``), around an injected ``run_fn`` that runs a :class:`CompletionCall`.
* :class:`EndpointPublisher` -- ``ensure_endpoint(request, consumer_manifest)`` /
  ``release_endpoint(lease)``: a provider and model published at its own base URL and token, for a TTL,
  its leases in a :class:`LeaseStore` (:class:`MemoryLeaseStore`, or :class:`StoreLeaseStore` over the
  controller's run store); :func:`endpoints_router` -- ``POST /v1/endpoints`` / ``DELETE /v1/endpoints/{ref}``.
* The contracts (:class:`ConsumerManifest`, :class:`BackendManifest`, :class:`CompatibilityResult`,
  :class:`EndpointDescriptor`) and ASM's compatibility check (:func:`resolve_compatibility`).
* :func:`fleet_run_fn` / :func:`session_run_fn` -- ``run_fn`` as a run of the fleet service / a Session.
* The mappings, usable without HTTP: :func:`parse_model`, :func:`build_prompt`, :func:`check_request`,
  :func:`finish_reason`, :func:`usage`, :class:`CompletionBuilder` (a run's events -> response / chunks).

    app.include_router(inference_router(run_fn, list_models_fn, publisher=EndpointPublisher(base_url)))
"""

from asm_controller.inference._adapters import StartsRuns, fleet_run_fn, session_run_fn
from asm_controller.inference._completion import CompletionBuilder, complete, finish_reason, sse_frames, usage
from asm_controller.inference._contracts import (
    CONTRACT_VERSION,
    BackendCapabilities,
    BackendManifest,
    CompatibilityResult,
    ConsumerManifest,
    EndpointDescriptor,
    EndpointRequest,
    ModelPreference,
    backend_manifest,
    consumer_manifest,
    publication,
    resolve_compatibility,
)
from asm_controller.inference._errors import InferenceError, from_asm_error
from asm_controller.inference._leases import (
    DEFAULT_TTL_S,
    EndpointError,
    EndpointPublisher,
    Lease,
    LeaseStore,
    MemoryLeaseStore,
    token_digest,
)
from asm_controller.inference._modelid import PROVIDERS, ModelRef, catalog_ids, parse_model, resolve_provider
from asm_controller.inference._openai import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    Usage,
)
from asm_controller.inference._prompt import (
    MAX_MESSAGES,
    MAX_PROMPT_BYTES,
    TOOLS_REFUSED,
    build_prompt,
    check_request,
)
from asm_controller.inference._router import CompletionCall, ListModelsFn, PrincipalFn, RunFn, inference_router
from asm_controller.inference._storeleases import StoreLeaseStore

__all__ = [
    "CONTRACT_VERSION",
    "DEFAULT_TTL_S",
    "MAX_MESSAGES",
    "MAX_PROMPT_BYTES",
    "PROVIDERS",
    "SSE_DONE",
    "TOOLS_REFUSED",
    "BackendCapabilities",
    "BackendManifest",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompatibilityResult",
    "CompletionBuilder",
    "CompletionCall",
    "ConsumerManifest",
    "EndpointDescriptor",
    "EndpointError",
    "EndpointPublisher",
    "EndpointRequest",
    "ErrorBody",
    "ErrorDetail",
    "InferenceError",
    "Lease",
    "LeaseStore",
    "ListModelsFn",
    "MemoryLeaseStore",
    "ModelCard",
    "ModelList",
    "ModelPreference",
    "ModelRef",
    "PrincipalFn",
    "RunFn",
    "StartsRuns",
    "StoreLeaseStore",
    "Usage",
    "backend_manifest",
    "build_prompt",
    "catalog_ids",
    "check_request",
    "complete",
    "consumer_manifest",
    "finish_reason",
    "fleet_run_fn",
    "from_asm_error",
    "inference_router",
    "parse_model",
    "publication",
    "resolve_compatibility",
    "resolve_provider",
    "session_run_fn",
    "sse_frames",
    "token_digest",
    "usage",
]
