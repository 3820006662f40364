"""The database schema (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Migrations in ``storage/migrations/versions`` create exactly these tables; a test
compares the migrated database with this metadata. Times are integer milliseconds
since the epoch. Addresses are ``user@node`` strings so that remote users fit.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    true,
)

# SQLite only makes INTEGER PRIMARY KEY an alias of its auto-incrementing rowid.
SeqType = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("username", String(32), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("read_receipts", Boolean, nullable=False, default=True),
    Column("last_seen", BigInteger, nullable=True),
    Column("show_presence", Boolean, nullable=False, default=True, server_default=true()),
    # The profile: public metadata that any user of any node may read (not encrypted).
    Column("display_name", String(64), nullable=False, default="", server_default=""),
    Column("status_text", String(140), nullable=False, default="", server_default=""),
    # Whether directory searches find the user (their address still reaches them).
    Column("listed", Boolean, nullable=False, default=True, server_default=true()),
    Column("profile_updated_at", BigInteger, nullable=True),
)

# A user's avatar (PNG, JPEG or WebP, checked by its magic bytes); ``digest`` is the
# SHA-256 of ``data`` in hex, which clients use to tell a new picture from a cached one.
avatars = Table(
    "avatars",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("content_type", String(16), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

invites = Table(
    "invites",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("code_hash", LargeBinary(32), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("max_uses", Integer, nullable=False, default=1),
    Column("uses", Integer, nullable=False, default=0),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("note", String(200), nullable=False, default=""),
)

devices = Table(
    "devices",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(64), nullable=False, default=""),
    Column("identity_key", LargeBinary(32), nullable=False),
    Column("dh_key", LargeBinary(32), nullable=False),
    Column("spk_id", BigInteger, nullable=False),
    Column("spk_key", LargeBinary(32), nullable=False),
    Column("spk_sig", LargeBinary(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # Last user_events.seq this device acknowledged: its backlog starts after it.
    Column("cursor", BigInteger, nullable=False, default=0),
)

one_time_prekeys = Table(
    "one_time_prekeys",
    metadata,
    Column("device_id", BigInteger, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("key_id", BigInteger, primary_key=True),
    Column("key", LargeBinary(32), nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("token_hash", LargeBinary(32), nullable=False, unique=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("device_id", BigInteger, ForeignKey("devices.id", ondelete="CASCADE"), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    # For a direct conversation: the two addresses, sorted, joined by a space.
    Column("key", String(300), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
)

conversation_members = Table(
    "conversation_members",
    metadata,
    Column("conversation_id", BigInteger, ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True),
    Column("address", String(200), primary_key=True),
    # Set for members on this node.
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True),
)

messages = Table(
    "messages",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("conversation_id", BigInteger, ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
    Column("sender", String(200), nullable=False),
    Column("sender_device", String(64), nullable=False),
    Column("client_id", String(64), nullable=False),
    # SHA-256 of the envelope as received: a retry with the same id must match it.
    Column("digest", LargeBinary(32), nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("sender", "client_id", name="uq_messages_sender_client_id"),
    Index("ix_messages_conversation_seq", "conversation_id", "seq"),
)

receipts = Table(
    "receipts",
    metadata,
    Column("message_seq", BigInteger, ForeignKey("messages.seq", ondelete="CASCADE"), primary_key=True),
    Column("recipient", String(200), primary_key=True),
    Column("delivered_at", BigInteger, nullable=False),
)

read_markers = Table(
    "read_markers",
    metadata,
    Column("conversation_id", BigInteger, ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True),
    Column("reader", String(200), primary_key=True),
    Column("upto_seq", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Per-user stream of durable events (messages, receipts) that devices consume in
# order and acknowledge with a cursor: the backlog of an offline device.
user_events = Table(
    "user_events",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("message_seq", BigInteger, ForeignKey("messages.seq", ondelete="CASCADE"), nullable=True),
    Column("payload", Text, nullable=True),
    Index("ix_user_events_user_seq", "user_id", "seq"),
)

# Names of deleted accounts: never given out again, so nobody inherits a deleted
# user's address, and with it their conversations and their contacts' trust.
retired_usernames = Table(
    "retired_usernames",
    metadata,
    Column("username", String(32), primary_key=True),
    Column("retired_at", BigInteger, nullable=False),
)

# -- federation ---------------------------------------------------------------------
# One row per remote node ever heard of: who it is (name pinned to the first peer id
# seen with it), where it is, how it was found, and the state of our outbox to it:
# ``next_oid`` is the oid the next event gets, ``acked_oid`` what the node holds.
fed_nodes = Table(
    "fed_nodes",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("peer_id", String(128), nullable=True, unique=True),
    Column("addrs", Text, nullable=False, default="[]"),
    Column("found_by", String(16), nullable=False),
    Column("first_seen", BigInteger, nullable=False),
    Column("last_seen", BigInteger, nullable=True),
    Column("blocked", Boolean, nullable=False, default=False),
    Column("next_oid", BigInteger, nullable=False, default=1),
    Column("acked_oid", BigInteger, nullable=False, default=0),
    Column("conflict", Text, nullable=True),
)

# Signed events waiting for a remote node to acknowledge them, in oid order.
fed_outbox = Table(
    "fed_outbox",
    metadata,
    Column("node", String(63), primary_key=True),
    Column("oid", BigInteger, primary_key=True),
    Column("event", LargeBinary, nullable=False),
    Column("sig", String(86), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# -- attachments ----------------------------------------------------------------------
# Encrypted blobs uploaded by this node's users (node/attachments.py). The bytes live
# on the filesystem under <data_dir>/blobs, named by ``digest`` (SHA-256 of the
# ciphertext, hex); these rows say what exists, who put it there, for which
# conversation, and which messages refer to it. ``last_upload_at`` is when it was last
# uploaded: a blob no message refers to is deleted once that is older than
# ``attachment_orphan_ttl_s``.
blobs = Table(
    "blobs",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("last_upload_at", BigInteger, nullable=False, index=True),
)

# Who uploaded a blob for which conversation: it is shown to members of that
# conversation only, and only its uploader may attach it to a message there.
blob_uploads = Table(
    "blob_uploads",
    metadata,
    Column("digest", String(64), ForeignKey("blobs.digest", ondelete="CASCADE"), primary_key=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("conversation_id", BigInteger, ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_blob_uploads_user", "user_id"),
)

# The messages that carry a blob (linked in the transaction that stores the message).
blob_refs = Table(
    "blob_refs",
    metadata,
    Column("digest", String(64), ForeignKey("blobs.digest", ondelete="CASCADE"), primary_key=True),
    Column("message_seq", BigInteger, ForeignKey("messages.seq", ondelete="CASCADE"), primary_key=True),
    Index("ix_blob_refs_message", "message_seq"),
)
