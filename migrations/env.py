import logging
from collections import Counter
from logging.config import fileConfig

from alembic import context
from flask import current_app

# this is the Alembic Config object, which provides
# access to the values within the .ini file in use.
config = context.config

# Alembic's log lines ("Running upgrade …") go to stderr, as alembic.ini says, unless logging is set up
# already (under pytest, which captures them): its handler is bound to the stderr of the moment, and
# one bound inside a test that captured stderr would write to a closed stream ever after.
# Keep the app's own loggers alive when migrations run inside it (tests, CLI).
if not logging.getLogger().handlers:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger('alembic.env')


def get_engine():
    return current_app.extensions['migrate'].db.engine


def get_engine_url():
    try:
        return get_engine().url.render_as_string(hide_password=False).replace(
            '%', '%%')
    except AttributeError:
        return str(get_engine().url).replace('%', '%%')


# add your model's MetaData object here
# for 'autogenerate' support
# from myapp import mymodel
# target_metadata = mymodel.Base.metadata
config.set_main_option('sqlalchemy.url', get_engine_url())
target_db = current_app.extensions['migrate'].db

# other values from the config, defined by the needs of env.py,
# can be acquired:
# my_important_option = config.get_main_option("my_important_option")
# ... etc.


def get_metadata():
    if hasattr(target_db, 'metadatas'):
        return target_db.metadatas[None]
    return target_db.metadata


def run_migrations_offline():
    """Run migrations in 'offline' mode.

    This configures the context with just a URL
    and not an Engine, though an Engine is acceptable
    here as well.  By skipping the Engine creation
    we don't even need a DBAPI to be available.

    Calls to context.execute() here emit the given string to the
    script output.

    """
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url, target_metadata=get_metadata(), literal_binds=True
    )

    with context.begin_transaction():
        context.run_migrations()


def _dangling(connection) -> Counter:
    """SQLite's rows whose foreign key points at nothing, counted per (table, parent table)."""
    return Counter((table, parent) for table, _, parent, _ in connection.exec_driver_sql('PRAGMA foreign_key_check'))


def run_migrations_online():
    """Run migrations in 'online' mode.

    In this scenario we need to create an Engine
    and associate a connection with the context.

    """

    # this callback is used to prevent an auto-migration from being generated
    # when there are no changes to the schema
    # reference: http://alembic.zzzcomputing.com/en/latest/cookbook.html
    def process_revision_directives(context, revision, directives):
        if getattr(config.cmd_opts, 'autogenerate', False):
            script = directives[0]
            if script.upgrade_ops.is_empty():
                directives[:] = []
                logger.info('No changes in schema detected.')

    conf_args = current_app.extensions['migrate'].configure_args
    if conf_args.get("process_revision_directives") is None:
        conf_args["process_revision_directives"] = process_revision_directives

    connectable = get_engine()

    with connectable.connect() as connection:
        sqlite = connection.dialect.name == 'sqlite'
        if sqlite:
            # Batch mode rebuilds a SQLite table (copy, drop, rename): with foreign keys enforced, dropping
            # a table that others point at fails. They are off while migrating; rows the migrations leave
            # pointing at nothing are named at the end (rows that did so before are not theirs to answer for).
            connection.exec_driver_sql('PRAGMA foreign_keys=OFF')
            dangling_before = _dangling(connection)
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=get_metadata(),
            **conf_args
        )

        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                added = _dangling(connection) - dangling_before
                if added:
                    # SQLite's DDL is not transactional: what ran is applied; say so loudly, once.
                    raise RuntimeError(
                        f'the migrations left rows pointing at nothing (table, parent: count): {dict(added)}'
                    )
        if sqlite:
            connection.exec_driver_sql('PRAGMA foreign_keys=ON')
            connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
