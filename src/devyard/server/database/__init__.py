"""The management plane's database: the engine, the tables and the migrations.

SQLite is the default (WAL, foreign keys, a busy timeout, ``BEGIN IMMEDIATE`` for write transactions so that
writers queue instead of failing on lock upgrades); PostgreSQL is equal (asyncpg). Column types work on both.
Migrations run on start (``migrate.upgrade``) and are tested on both.
"""
