"""Users' objects in S3: copied, verified and rolled back with their rows.

Per batch of users, the object keys come from the spec's key column (read at the source
database) and/or a listing of each user's key prefix at the source endpoint. Objects are
copied by a bounded thread pool (see `stores.s3.copy_object`); the batch's manifest (key,
size, SHA-256) and a checkpoint are written to the control database, so a resumed copy
starts at the next batch and skips objects already copied. Verification re-reads the
bytes on both sides and compares them with the manifest; the manifest digest is part of
the shard digest. Rollback deletes exactly the manifest's keys at the destination.
"""

from migrator.objects.common import enabled, ensure, manifest, manifest_digest, settings
from migrator.objects.copy import copy_batches
from migrator.objects.purge import keys_digest, purge_batch
from migrator.objects.rollback import rollback
from migrator.objects.verify import verify

__all__ = [
    "copy_batches",
    "enabled",
    "ensure",
    "keys_digest",
    "manifest",
    "manifest_digest",
    "purge_batch",
    "rollback",
    "settings",
    "verify",
]
