"""The shapes of /api/v1/images: the images the node holds, the pulls in flight, a pull ahead."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from ..schemas import IMAGE_PATTERN, FullMatch, RegistryAuthSchema, ResponseSchema

IMAGE_ORIGINS = ("pulled", "pulled_private", "preloaded")
IMAGE_STATES = ("present", "pulling", "failed")


class PullImageSchema(Schema):
    """POST /api/v1/images body: pull ahead of the claims that will need the image."""

    image = fields.String(
        required=True,
        validate=[validate.Length(max=512), FullMatch(IMAGE_PATTERN, error="is not a valid image reference")],
        metadata={"description": "Image reference to pull."},
    )
    registry_auth = fields.Nested(RegistryAuthSchema, metadata={"description": "Credentials for the image's registry, as a create takes them."})


class ImagePathSchema(Schema):
    """The path of DELETE /api/v1/images/<reference>; an unknown reference is a 404."""

    reference = fields.String(metadata={"description": "An image reference (`registry/name:tag`) or id the engine knows."})


class PullProgressSchema(ResponseSchema):
    downloaded_bytes = fields.Integer(required=True, metadata={"description": "Bytes of the layers downloaded so far."})
    total_bytes = fields.Integer(required=True, metadata={"description": "Bytes of the layers the engine has started on."})


class ImageSchema(ResponseSchema):
    image = fields.String(required=True, metadata={"description": "The reference (the one the agent pulled, else the engine's first)."})
    id = fields.String(required=True, allow_none=True, metadata={"description": "The image id; null while pulling."})
    size_mb = fields.Float(required=True, allow_none=True, metadata={"description": "Size in MB; null while pulling."})
    origin = fields.String(required=True, validate=validate.OneOf(IMAGE_ORIGINS), metadata={
        "description": "`pulled` (by the agent, without credentials), `pulled_private` (with credentials: a create needs its own), "
                       "`preloaded` (the operator's; never collected)."})
    claims = fields.List(fields.String(), required=True, metadata={"description": "The claims whose containers use it."})
    last_used = fields.Integer(required=True, allow_none=True, metadata={
        "description": "Unix seconds of its last use by a container (within the collection interval); null for a preloaded image unused."})
    state = fields.String(required=True, validate=validate.OneOf(IMAGE_STATES), metadata={"description": "`present`, `pulling` or `failed`."})
    progress = fields.Nested(PullProgressSchema, required=True, allow_none=True, metadata={"description": "While pulling: bytes so far."})
    error = fields.String(allow_none=True, metadata={"description": "Why a failed pull failed."})
