"""Federation: remote nodes and the durable outbox of signed events to each.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fed_nodes",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("peer_id", sa.String(128), nullable=True, unique=True),
        sa.Column("addrs", sa.Text, nullable=False),
        sa.Column("found_by", sa.String(16), nullable=False),
        sa.Column("first_seen", sa.BigInteger, nullable=False),
        sa.Column("last_seen", sa.BigInteger, nullable=True),
        sa.Column("blocked", sa.Boolean, nullable=False),
        sa.Column("next_oid", sa.BigInteger, nullable=False),
        sa.Column("acked_oid", sa.BigInteger, nullable=False),
        sa.Column("conflict", sa.Text, nullable=True),
    )
    op.create_table(
        "fed_outbox",
        sa.Column("node", sa.String(63), primary_key=True),
        sa.Column("oid", sa.BigInteger, primary_key=True),
        sa.Column("event", sa.LargeBinary, nullable=False),
        sa.Column("sig", sa.String(86), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fed_outbox")
    op.drop_table("fed_nodes")
