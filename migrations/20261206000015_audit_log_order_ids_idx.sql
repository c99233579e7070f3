-- no-transaction
-- An order's entries in the audit log (`GET /admin/audit?order_id=`, the console's order page): the actions that
-- named it, found by containment (`order_ids @> array[id]`) in this index rather than by reading the whole log.
-- Built concurrently, so operators' actions go on while it builds.
create index concurrently audit_log_order_ids_idx on audit_log using gin (order_ids);
