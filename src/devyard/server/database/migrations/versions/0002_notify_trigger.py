"""On PostgreSQL, a trigger on the change feed sends the NOTIFY that wakes other replicas' watchers.

A trigger rather than a statement from the writer: the writer holds the revision counter's lock until it
commits, and every statement it saves shortens the queue of writers behind it.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION devyard_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('devyard_changes', '');
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER devyard_notify_changes AFTER INSERT ON changes "
        "FOR EACH STATEMENT EXECUTE FUNCTION devyard_notify_changes()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS devyard_notify_changes ON changes")
    op.execute("DROP FUNCTION IF EXISTS devyard_notify_changes()")
