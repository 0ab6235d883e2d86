"""The shapes of /api/v1/volumes: a claim volume, the body that makes one, the path that names one."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from ..schemas import CLAIM_ID_PATTERN, FullMatch, ResponseSchema, StrictInteger

# 64 TiB: past any local disk of a GPU node; the node's free disk is the real bound.
MAX_VOLUME_GB = 65536
VOLUME_BACKENDS = ("loop", "btrfs")


class CreateVolumeSchema(Schema):
    """POST /api/v1/volumes body; unknown fields are refused."""

    name = fields.String(
        required=True,
        validate=FullMatch(CLAIM_ID_PATTERN, error="must be 1-63 characters of letters, digits, '_', '.', '-', starting with a letter or digit"),
        metadata={"description": "The volume's name, unique on the node; what a create's `mounts` names."},
    )
    size_gb = StrictInteger(
        required=True,
        validate=validate.Range(1, MAX_VOLUME_GB),
        metadata={"description": "Its size in GiB: a hard limit, a write past it fails (ENOSPC or EDQUOT) in the container."},
    )


class VolumePathSchema(Schema):
    """The path of the routes of one volume; an unknown name is a 404."""

    name = fields.String(metadata={"description": "The volume's name."})


class VolumeSchema(ResponseSchema):
    name = fields.String(required=True, metadata={"description": "The volume's name."})
    size_gb = fields.Integer(required=True, metadata={"description": "Its size in GiB, enforced by the kernel."})
    used_mb = fields.Integer(allow_none=True, required=True, metadata={"description": "MiB in use (the filesystem's own "
                                                                                    "metadata included); null while it is not mounted."})
    created = fields.Integer(required=True, metadata={"description": "When it was made, in Unix seconds."})
    backend = fields.String(required=True, metadata={"enum": list(VOLUME_BACKENDS), "description": "How its size is enforced: `loop` "
                                                     "(a loop-mounted ext4 file) or `btrfs` (a subvolume under a qgroup limit)."})
    claims = fields.List(fields.String(), required=True, metadata={"description": "The claims whose containers (running or stopped) mount it."})
    ready = fields.Boolean(required=True, metadata={"description": "False for a volume whose create or delete was interrupted: "
                                                                   "no claim may mount it; the agent finishes it at its next start, or delete it."})
