"""What went wrong, in stable reasons, from what ComfyUI really returns:
a /prompt 400 body (`04*` recordings) or a history entry's messages (`06`, `36`)."""

from __future__ import annotations

from typing import Any

from services.contracts import worker
from services.errors import Reason

JsonDict = dict[str, Any]
MODEL_INPUTS = {
    "ckpt_name",
    "lora_name",
    "vae_name",
    "model_name",
    "unet_name",
    "clip_name",
    "control_net_name",
    "upscale_model",
}
OOM_MARKERS = ("OutOfMemoryError", "out of memory", "OOM")


def failed(
    prompt_id: str,
    reason: Reason,
    message: str,
    *,
    retryable: bool = False,
    node_id: str = "",
    node_type: str = "",
    exception_type: str = "",
    details: dict[str, str] | None = None,
) -> worker.Failed:
    return worker.Failed(
        prompt_id=prompt_id,
        reason=reason.value,
        message=message,
        retryable=retryable,
        node_id=node_id,
        node_type=node_type,
        exception_type=exception_type,
        details=details or {},
    )


def rejected_prompt(prompt_id: str, body: JsonDict) -> worker.Failed:
    """A /prompt 400: a missing model or, otherwise, an invalid workflow."""
    error: JsonDict = body["error"] if isinstance(body.get("error"), dict) else {}
    node_errors: JsonDict = body["node_errors"] if isinstance(body.get("node_errors"), dict) else {}
    for node_id, entry in node_errors.items():
        for item in entry.get("errors", []):
            extra = item.get("extra_info") or {}
            input_name = str(extra.get("input_name", ""))
            if item.get("type") == "value_not_in_list" and input_name in MODEL_INPUTS:
                config = extra.get("input_config") or [[]]
                available = config[0] if config and isinstance(config[0], list) else []
                return failed(
                    prompt_id,
                    Reason.MODEL_NOT_FOUND,
                    f"model {extra.get('received_value')!r} not found on this ComfyUI; "
                    f"available: {', '.join(map(str, available)) or 'none'}",
                    node_id=str(node_id),
                    node_type=str(entry.get("class_type", "")),
                    details={"input": input_name, "available": ",".join(map(str, available))},
                )
    for node_id, entry in node_errors.items():
        for item in entry.get("errors", []):
            extra = item.get("extra_info") or {}
            return failed(
                prompt_id,
                Reason.INVALID_WORKFLOW,
                f"node {node_id} ({entry.get('class_type', '?')}): "
                f"{item.get('message', '')}: {item.get('details', '')}".rstrip(": "),
                node_id=str(node_id),
                node_type=str(entry.get("class_type", "")),
                details={
                    "input": str(extra.get("input_name", "")),
                    "type": str(item.get("type", "")),
                },
            )
    return failed(
        prompt_id,
        Reason.INVALID_WORKFLOW,
        f"{error.get('message', 'prompt rejected')}: {error.get('details', '')}".rstrip(": "),
        details={"type": str(error.get("type", ""))},
    )


def from_history(prompt_id: str, entry: JsonDict) -> worker.Failed | None:
    """None when the history entry is a success, else the classified failure."""
    status = entry.get("status") or {}
    if status.get("status_str", "success") == "success" and status.get("completed", True):
        return None
    for kind, data in reversed(status.get("messages", [])):
        if kind == "execution_error":
            return execution_error(prompt_id, data)
        if kind == "execution_interrupted":
            return interrupted(prompt_id, data)
    return failed(prompt_id, Reason.EXECUTION_ERROR, "ComfyUI reports the prompt as failed")


def execution_error(prompt_id: str, data: JsonDict) -> worker.Failed:
    message = str(data.get("exception_message", "")).strip()
    exception_type = str(data.get("exception_type", ""))
    oom = any(marker in exception_type or marker in message for marker in OOM_MARKERS)
    return failed(
        prompt_id,
        Reason.GPU_OUT_OF_MEMORY if oom else Reason.EXECUTION_ERROR,
        message.splitlines()[0] if message else exception_type,
        node_id=str(data.get("node_id", "")),
        node_type=str(data.get("node_type", "")),
        exception_type=exception_type,
    )


def interrupted(prompt_id: str, data: JsonDict) -> worker.Failed:
    return failed(
        prompt_id,
        Reason.INTERRUPTED,
        "the prompt was interrupted",
        node_id=str(data.get("node_id", "")),
        node_type=str(data.get("node_type", "")),
    )
