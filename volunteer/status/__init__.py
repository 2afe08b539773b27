"""``volunteer status`` rendering: a rich dashboard (or plain text / JSON) from a snapshot."""
