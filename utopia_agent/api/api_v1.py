"""/api/v1: every route under it requires the bearer token."""

from flask import Blueprint

from .auth import require_token
from ..services import services
from . import containers, events, exec, gpus, images, metrics, node, volumes

blueprint = Blueprint("api_v1", __name__, url_prefix="/api/v1")
# What the OpenAPI document says of every route under this blueprint.
SECURITY = ({"bearer": []},)


@blueprint.before_request
def authenticate():
    require_token(services().config)


blueprint.register_blueprint(containers.blueprint)
blueprint.register_blueprint(exec.blueprint)
blueprint.register_blueprint(metrics.blueprint)
blueprint.register_blueprint(gpus.blueprint)
blueprint.register_blueprint(node.blueprint)
blueprint.register_blueprint(images.blueprint)
blueprint.register_blueprint(events.blueprint)
blueprint.register_blueprint(volumes.blueprint)
