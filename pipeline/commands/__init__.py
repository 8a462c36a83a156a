"""What a user runs: predict, chat, merge, rollback, reproduce (a registered adapter), sweep, run_profile."""
