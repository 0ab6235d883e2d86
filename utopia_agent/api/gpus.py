"""GPUs: their states, and the operator's quarantine."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..services import services
from ..schemas import ReasonSchema
from .bodies import load_body

blueprint = Blueprint("gpus", __name__, url_prefix="/gpus")
_reason_schema = ReasonSchema()


@blueprint.get("")
def list_gpus():
    return jsonify([view.to_dict() for view in services().gpus.views()])


@blueprint.post("/<uuid>/quarantine")
def quarantine_gpu(uuid: str):
    reason = load_body(_reason_schema)["reason"]
    return jsonify(services().gpus.quarantine(uuid, reason).to_dict())


@blueprint.delete("/<uuid>/quarantine")
def release_gpu(uuid: str):
    return jsonify(services().gpus.release(uuid).to_dict())
