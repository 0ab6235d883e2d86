"""GET /api/v1/metrics: the node's own figures and its GPUs', as the route dumps them and the client loads them.

Beside the other schemas of the contract (utopia_agent/schemas.py), as images/schemas.py holds the images'."""

from __future__ import annotations

from marshmallow import fields

from ..schemas import GPU_STATES, ResponseSchema


class GpuMetricsSchema(ResponseSchema):
    """One GPU of GET /api/v1/metrics, dumped from a gpu_health.GpuView."""

    read_from = {
        "id": "status.index",
        "temperature_c": "status.temperature_c",
        "memory_total_mb": "status.memory_total_mb",
        "memory_used_mb": "status.memory_used_mb",
        "name": "status.name",
        "uuid": "status.uuid",
        "busy": lambda view: view.state != "free",
        "usage_percent": "status.usage_percent",
        "healthy": lambda view: view.state not in ("lost", "quarantined"),
    }

    id = fields.Integer(required=True, metadata={"description": "NVML index."})
    temperature_c = fields.Integer(allow_none=True, required=True, metadata={"description": "Degrees Celsius; null when NVML cannot read it."})
    memory_total_mb = fields.Integer(allow_none=True, required=True, metadata={"description": "Memory in MiB; null when unreadable."})
    memory_used_mb = fields.Integer(allow_none=True, required=True, metadata={"description": "Used memory in MiB; null when unreadable."})
    name = fields.String(allow_none=True, required=True, metadata={"description": "Product name; null when unreadable."})
    uuid = fields.String(allow_none=True, required=True, metadata={"description": "GPU UUID; null when unreadable (such a GPU is never given)."})
    busy = fields.Boolean(required=True, metadata={"description": "Not free: the allocator would not give it now (see `state`)."})
    usage_percent = fields.Float(allow_none=True, required=True, metadata={"description": "Utilisation in percent; null when unreadable."})
    healthy = fields.Boolean(required=True, metadata={"description": "Neither lost nor quarantined."})
    state = fields.String(required=True, metadata={"enum": GPU_STATES,
        "description": "free, allocated, releasing (not yet clean after its claim), quarantined or lost."})


class SystemMetricsSchema(ResponseSchema):
    cpu_usage_percent = fields.Float(required=True, metadata={"description": "CPU use in percent, from the previous sample."})
    memory_usage_percent = fields.Float(required=True, metadata={"description": "Memory use in percent."})
    memory_total_mb = fields.Integer(required=True, metadata={"description": "Memory in MiB."})
    memory_used_mb = fields.Integer(required=True, metadata={"description": "Used memory in MiB."})
    disk_usage_percent = fields.Float(required=True, metadata={"description": "Use of the root file system in percent."})
    load_average = fields.Float(required=True, metadata={"description": "1-minute load average."})
    uptime = fields.Integer(required=True, metadata={"description": "The node's uptime in seconds."})


class MetricsSchema(ResponseSchema):
    read_from = {"cpu_usage_percent": "system.cpu_usage_percent", "memory_usage_percent": "system.memory_usage_percent"}

    node_id = fields.String(required=True, metadata={"description": "UTOPIA_AGENT_NODE_ID, by default the hostname."})
    cpu_usage_percent = fields.Float(required=True, metadata={"description": "CPU use in percent, as in `system`."})
    memory_usage_percent = fields.Float(required=True, metadata={"description": "Memory use in percent, as in `system`."})
    gpus = fields.List(fields.Nested(GpuMetricsSchema), required=True, metadata={"description": "Every GPU, in index order."})
    gpus_stale = fields.Boolean(required=True, metadata={"description": "True while NVML is hung: the GPU figures are the last good sample."})
    gpus_sampled_at = fields.Float(allow_none=True, required=True, metadata={"description": "Unix time of the GPU sample."})
    system = fields.Nested(SystemMetricsSchema, required=True, metadata={"description": "The node's own figures."})
