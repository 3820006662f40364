"""The first schema: accounts, devices and keys, sessions, conversations, messages, receipts.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", Seq, primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(32), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("read_receipts", sa.Boolean, nullable=False),
        sa.Column("last_seen", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "invites",
        sa.Column("id", Seq, primary_key=True, autoincrement=True),
        sa.Column("code_hash", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=True),
        sa.Column("max_uses", sa.Integer, nullable=False),
        sa.Column("uses", sa.Integer, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("note", sa.String(200), nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", Seq, primary_key=True, autoincrement=True),
        sa.Column("public_id", sa.String(32), nullable=False, unique=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("identity_key", sa.LargeBinary(32), nullable=False),
        sa.Column("dh_key", sa.LargeBinary(32), nullable=False),
        sa.Column("spk_id", sa.BigInteger, nullable=False),
        sa.Column("spk_key", sa.LargeBinary(32), nullable=False),
        sa.Column("spk_sig", sa.LargeBinary(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("cursor", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "one_time_prekeys",
        sa.Column("device_id", sa.BigInteger, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key_id", sa.BigInteger, primary_key=True),
        sa.Column("key", sa.LargeBinary(32), nullable=False),
    )
    op.create_table(
        "sessions",
        sa.Column("id", Seq, primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("device_id", sa.BigInteger, sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    op.create_table(
        "conversations",
        sa.Column("id", Seq, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(300), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "conversation_members",
        sa.Column("conversation_id", sa.BigInteger, sa.ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("address", sa.String(200), primary_key=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True),
    )
    op.create_table(
        "messages",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("conversation_id", sa.BigInteger, sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("sender", sa.String(200), nullable=False),
        sa.Column("sender_device", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("envelope", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("sender", "client_id", name="uq_messages_sender_client_id"),
    )
    op.create_index("ix_messages_conversation_seq", "messages", ["conversation_id", "seq"])
    op.create_table(
        "receipts",
        sa.Column("message_seq", sa.BigInteger, sa.ForeignKey("messages.seq", ondelete="CASCADE"), primary_key=True),
        sa.Column("recipient", sa.String(200), primary_key=True),
        sa.Column("delivered_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "read_markers",
        sa.Column("conversation_id", sa.BigInteger, sa.ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("reader", sa.String(200), primary_key=True),
        sa.Column("upto_seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "user_events",
        sa.Column("seq", Seq, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("message_seq", sa.BigInteger, sa.ForeignKey("messages.seq", ondelete="CASCADE"), nullable=True),
        sa.Column("payload", sa.Text, nullable=True),
    )
    op.create_index("ix_user_events_user_seq", "user_events", ["user_id", "seq"])


def downgrade() -> None:
    for table in (
        "user_events", "read_markers", "receipts", "messages", "conversation_members",
        "conversations", "sessions", "one_time_prekeys", "devices", "invites", "users",
    ):
        op.drop_table(table)
