"""Environment logs: the chunks runners ship, kept per environment and stream, deleted with the environment.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "environment_logs",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("environment_id", sa.String(length=40), nullable=False),
        sa.Column("stream", sa.String(length=200), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("byte_offset", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("retained", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["resources.id"],
            name=op.f("fk_environment_logs_environment_id_resources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_environment_logs")),
        sa.UniqueConstraint(
            "environment_id",
            "stream",
            "epoch",
            "byte_offset",
            name=op.f("uq_environment_logs_environment_id_stream_epoch_byte_offset"),
        ),
    )
    with op.batch_alter_table("environment_logs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_environment_logs_environment_id_seq"), ["environment_id", "seq"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_environment_logs_environment_id_stream_seq"),
            ["environment_id", "stream", "seq"],
            unique=False,
        )


def downgrade() -> None:
    op.drop_table("environment_logs")
