-- Validates the role check added NOT VALID by 20261206000009, in a transaction of its own: it scans `users`
-- under a SHARE UPDATE EXCLUSIVE lock, which lets logins and registrations go on meanwhile.
alter table users validate constraint users_role_known;
