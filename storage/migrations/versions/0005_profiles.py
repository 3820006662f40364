"""Profiles: display name, status text, a place in the user directory, and an avatar.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("display_name", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("status_text", sa.String(140), nullable=False, server_default=""))
        batch.add_column(sa.Column("listed", sa.Boolean, nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("profile_updated_at", sa.BigInteger, nullable=True))
    # Avatars apart from users: a users row is read on every request, an avatar rarely.
    op.create_table(
        "avatars",
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("content_type", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("avatars")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("profile_updated_at")
        batch.drop_column("listed")
        batch.drop_column("status_text")
        batch.drop_column("display_name")
