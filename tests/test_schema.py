"""The models and the migrations describe the same schema: `flask db check` finds nothing to add."""


def test_the_migrations_match_the_models(runner):
    # Alembic's check fails (exit 1, "New upgrade operations detected") on any difference.
    result = runner.invoke(args=["db", "check"])
    assert result.exit_code == 0, result.output
