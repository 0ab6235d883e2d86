"""Claim volumes: make one with a hard size, list and show them with the claims mounting each, remove one."""

from __future__ import annotations

from flask import Blueprint, url_for

from ..errors import InsufficientStorage, InvalidRequest, NodeFault, VolumeExists, VolumeInUse, VolumeNotFound
from ..services import services
from ..volumes.schemas import CreateVolumeSchema, VolumePathSchema, VolumeSchema
from .operations import ENGINE_DOWN, LIST_FAILED, LOCK_OR_ENGINE, Reply, Responds, Routes, fails

blueprint = Blueprint("volumes", __name__, url_prefix="/volumes")
routes = Routes(blueprint, tag="volumes", path=VolumePathSchema())
_volume = VolumeSchema()
NOT_FOUND = fails("No volume of that name.", VolumeNotFound)


@routes.post("", "createVolume", summary="Make a claim volume of a hard size, kept until it is deleted",
             body=CreateVolumeSchema(),
             responds=Responds(201, "Made, and mounted on the node.", _volume),
             failures=(
                 fails("The body is not valid; `errors` names each field.", InvalidRequest),
                 fails("A volume of that name exists.", VolumeExists),
                 fails("The node could not make it (the backend's command failed); nothing of it is left.", NodeFault),
                 fails("The filesystem holding the claim volumes has no room for it; nothing of it is left.", InsufficientStorage),
                 LOCK_OR_ENGINE,
             ))
def create_volume(body: dict):
    volume = services().volumes.create(body["name"], body["size_gb"])
    return Reply(volume, 201, {"Location": url_for("api_v1.volumes.get_volume", name=volume.name)})


@routes.get("", "listVolumes", summary="Every claim volume, with its size, use and the claims mounting it",
            responds=Responds(200, "Every volume, by name.", VolumeSchema(many=True)),
            failures=(LIST_FAILED, ENGINE_DOWN))
def list_volumes():
    return services().volumes.list()


@routes.get("/<name>", "getVolume", summary="One claim volume", responds=Responds(200, "The volume.", _volume),
            failures=(NOT_FOUND, LIST_FAILED, ENGINE_DOWN))
def get_volume(name: str):
    return services().volumes.get(name)


@routes.delete("/<name>", "deleteVolume", summary="Remove a claim volume and its data",
               responds=Responds(204, "Removed.", content_type=None),
               failures=(
                   NOT_FOUND,
                   fails("A claim's container (running or stopped) mounts it: `claim_id` names one.", VolumeInUse),
                   fails("The node could not remove it (the backend's command failed); it is still listed, and a delete may be tried again.",
                         NodeFault),
                   LIST_FAILED,
                   LOCK_OR_ENGINE,
               ))
def delete_volume(name: str):
    services().volumes.delete(name)
    return Reply(None, 204)
