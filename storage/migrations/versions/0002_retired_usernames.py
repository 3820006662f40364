"""Retired usernames: a deleted account's name is never given out again.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retired_usernames",
        sa.Column("username", sa.String(32), primary_key=True),
        sa.Column("retired_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("retired_usernames")
