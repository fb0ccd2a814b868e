"""Study operations: expected vs received, reminders, reports, qualification, upgrades."""
