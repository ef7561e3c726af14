"""Teacher-cache shards: Arrow schema (versioned), atomic writer, manifest and key.

See :mod:`kubedistill.shards.schema` for the row layout and encodings,
:mod:`kubedistill.shards.writer` for the visibility protocol, and
:mod:`kubedistill.shards.manifest` for the manifest and cache key.
"""

from kubedistill.shards.manifest import KEY_PARTS, POSITIONS_POLICY, build_manifest, check_key
from kubedistill.shards.schema import DTYPES, SCHEMA_VERSION, decode_hidden, shard_schema
from kubedistill.shards.writer import ShardRow, write_shard

__all__ = ["DTYPES", "KEY_PARTS", "POSITIONS_POLICY", "SCHEMA_VERSION", "ShardRow",
           "build_manifest", "check_key", "decode_hidden", "shard_schema", "write_shard"]
