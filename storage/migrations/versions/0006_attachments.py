"""Attachments: encrypted blobs (their bytes are files in the data directory), who
uploaded them for which conversation, and the messages that carry them.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("last_upload_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_blobs_last_upload_at", "blobs", ["last_upload_at"])
    op.create_table(
        "blob_uploads",
        sa.Column("digest", sa.String(64), sa.ForeignKey("blobs.digest", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("conversation_id", sa.BigInteger, sa.ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_blob_uploads_user", "blob_uploads", ["user_id"])
    op.create_table(
        "blob_refs",
        sa.Column("digest", sa.String(64), sa.ForeignKey("blobs.digest", ondelete="CASCADE"), primary_key=True),
        sa.Column("message_seq", sa.BigInteger, sa.ForeignKey("messages.seq", ondelete="CASCADE"), primary_key=True),
    )
    op.create_index("ix_blob_refs_message", "blob_refs", ["message_seq"])


def downgrade() -> None:
    op.drop_table("blob_refs")
    op.drop_table("blob_uploads")
    op.drop_index("ix_blobs_last_upload_at", "blobs")
    op.drop_table("blobs")
