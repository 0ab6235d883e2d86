"""The node's images: list them with the pulls in flight, pull ahead of the claims, remove one."""

from __future__ import annotations

from flask import Blueprint

from ..engine.image_pull import RegistryAuth
from ..errors import EngineError, ImageInUse, ImagePullFailed, ImageUnavailable, InvalidRequest, NotFound
from ..images.schemas import ImagePathSchema, ImageSchema, PullImageSchema
from ..services import services
from .operations import ENGINE_DOWN, Reply, Responds, Routes, fails

blueprint = Blueprint("images", __name__, url_prefix="/images")
routes = Routes(blueprint, tag="images", path=ImagePathSchema())
_image = ImageSchema()


@routes.get("", "listImages", summary="The images the node holds (size, origin, the claims using each, last use) and the pulls in flight",
            responds=Responds(200, "Every image, then every pull under way or failed lately.", ImageSchema(many=True)),
            failures=(fails("The engine failed to list the images.", EngineError), ENGINE_DOWN))
def list_images():
    return services().images.listing()


@routes.post("", "pullImage", summary="Pull an image ahead of the claims that will need it",
             body=PullImageSchema(),
             responds=(Responds(202, "The pull started; GET /api/v1/images shows its progress.", _image),
                       Responds(200, "The node has the image already (a private one: and the registry accepts these credentials).", _image)),
             failures=(
                 fails("The body is not valid; or the registry refused the credentials given (or none were given for an image private on "
                       "this node).", InvalidRequest, ImageUnavailable),
                 fails("The registry could not be asked, or the engine failed.", ImagePullFailed, EngineError),
                 ENGINE_DOWN,
             ))
def pull_image(body: dict):
    images = services().images
    auth = RegistryAuth.of(body)
    shown = images.pull_ahead(body["image"], auth)
    return Reply(shown, 202 if shown["state"] == "pulling" else 200)


@routes.delete("/<path:reference>", "deleteImage", summary="Remove an image no container uses",
               responds=Responds(204, "Removed.", content_type=None),
               failures=(
                   fails("No such image on the node.", NotFound),
                   fails("A container, running or not, was made from the image (the message names the claims).", ImageInUse),
                   fails("The engine failed to remove it.", EngineError),
                   ENGINE_DOWN,
               ))
def delete_image(reference: str):
    services().images.remove(reference)
