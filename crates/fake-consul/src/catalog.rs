//! Services and checks: the agent's local registrations and the catalog view `/v1/health` reads.
//!
//! A real agent keeps local state and syncs it to the servers by anti-entropy; the fake has one
//! node, so a registration is in the catalog at once. As in Consul, only status changes move
//! indexes (output-only updates are synced lazily by a real agent), and re-registering an
//! identical service moves nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::state::{DATACENTER, NODE, NODE_ID, State};

/// The check statuses Consul knows.
pub(crate) const PASSING: &str = "passing";
pub(crate) const WARNING: &str = "warning";
pub(crate) const CRITICAL: &str = "critical";

/// A service definition as registered, without indexes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceDef {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) tags: Vec<String>,
    pub(crate) address: String,
    pub(crate) port: i64,
    pub(crate) meta: BTreeMap<String, String>,
}

/// A check definition as registered, with its `CheckID` already defaulted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckDef {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) notes: String,
    /// The initial status (`critical` unless the registration said otherwise).
    pub(crate) status: String,
    /// Set for TTL checks; other check kinds are stored but never run.
    pub(crate) ttl: Option<Duration>,
    /// `DeregisterCriticalServiceAfter`, honoured exactly.
    pub(crate) deregister_after: Option<Duration>,
}

/// A registration from `/v1/agent/service/register`.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) service: ServiceDef,
    pub(crate) checks: Vec<CheckDef>,
    /// `?replace-existing-checks`: drop the service's checks missing from this registration.
    pub(crate) replace_existing_checks: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub(crate) def: ServiceDef,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub(crate) def: CheckDef,
    pub(crate) service_id: String,
    pub(crate) service_name: String,
    pub(crate) status: String,
    pub(crate) output: String,
    /// When the TTL lapses unless the check is updated.
    pub(crate) ttl_deadline: Option<Instant>,
    /// The output of the last TTL update, quoted when the TTL lapses.
    pub(crate) ttl_output: String,
    /// Since when the check has been critical.
    pub(crate) critical_since: Option<Instant>,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

/// Why a TTL update was refused.
#[derive(Debug)]
pub(crate) enum CheckUpdateError {
    /// No check has that ID (HTTP 404).
    Unknown,
    /// The check is not a TTL check (HTTP 500).
    NotTtl,
}

/// The services and checks of the one node, with the indexes blocking queries compare.
#[derive(Debug)]
pub(crate) struct Catalog {
    pub(crate) services: BTreeMap<String, Service>,
    pub(crate) checks: BTreeMap<String, Check>,
    /// The last index at which anything in the catalog changed.
    index: u64,
    /// The last index at which an instance of each live service name changed.
    name_index: HashMap<String, u64>,
    /// The last index at which a service name lost its last instance.
    extinction_index: u64,
    /// The index at which the node (and `serfHealth`) was registered.
    node_index: u64,
}

impl Catalog {
    pub(crate) fn new(start: u64) -> Self {
        Catalog {
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            index: start,
            name_index: HashMap::new(),
            extinction_index: 0,
            node_index: start,
        }
    }

    /// Records a change to service `name` at `idx`.
    fn touch(&mut self, name: &str, idx: u64) {
        self.index = idx;
        if self.services.values().any(|s| s.def.name == name) {
            self.name_index.insert(name.to_owned(), idx);
        } else {
            self.name_index.remove(name);
            self.extinction_index = idx;
        }
    }

    /// The `X-Consul-Index` of `/v1/health/service/<name>`: the service name's own index, or,
    /// for a name with no instances, the last extinction (Consul's `maxIndexForService`).
    pub(crate) fn index_for(&self, name: &str) -> u64 {
        match self.name_index.get(name) {
            Some(idx) => *idx,
            None if self.extinction_index > 0 => self.extinction_index,
            None => self.index,
        }
    }

    /// The worst status among a service's checks, counting the node's passing `serfHealth`.
    pub(crate) fn aggregate_status(&self, service_id: &str) -> &'static str {
        let statuses = self.checks.values().filter(|c| c.service_id == service_id);
        statuses.fold(PASSING, |worst, c| match (worst, c.status.as_str()) {
            (CRITICAL, _) | (_, CRITICAL) => CRITICAL,
            (WARNING, _) | (_, WARNING) => WARNING,
            _ => PASSING,
        })
    }

    /// `/v1/health/service/<name>` entries, optionally only those with every check passing.
    pub(crate) fn health(&self, name: &str, passing_only: bool) -> Vec<Value> {
        let instances = self.services.values().filter(|s| s.def.name == name);
        let instances =
            instances.filter(|s| !passing_only || self.aggregate_status(&s.def.id) == PASSING);
        instances.map(|s| self.health_entry(s)).collect()
    }

    fn health_entry(&self, service: &Service) -> Value {
        let def = &service.def;
        let mut checks = vec![self.serf_health_json()];
        let own = self.checks.values().filter(|c| c.service_id == def.id);
        checks.extend(own.map(|c| check_json(c, &def.tags)));
        json!({
            "Node": {
                "ID": NODE_ID,
                "Node": NODE,
                "Address": "127.0.0.1",
                "Datacenter": DATACENTER,
                "TaggedAddresses": { "lan": "127.0.0.1", "lan_ipv4": "127.0.0.1", "wan": "127.0.0.1", "wan_ipv4": "127.0.0.1" },
                "Meta": { "consul-network-segment": "" },
                "CreateIndex": self.node_index,
                "ModifyIndex": self.node_index,
            },
            "Service": {
                "ID": def.id,
                "Service": def.name,
                "Tags": def.tags,
                "Address": def.address,
                "Meta": def.meta,
                "Port": def.port,
                "Weights": { "Passing": 1, "Warning": 1 },
                "EnableTagOverride": false,
                "Datacenter": DATACENTER,
                "CreateIndex": service.create_index,
                "ModifyIndex": service.modify_index,
            },
            "Checks": checks,
        })
    }

    fn serf_health_json(&self) -> Value {
        json!({
            "Node": NODE, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": PASSING,
            "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
            "ServiceTags": [], "Type": "", "Definition": {},
            "CreateIndex": self.node_index, "ModifyIndex": self.node_index,
        })
    }

    /// Lowers every index to at most `to` (see `State::reset_index`).
    pub(crate) fn lower_indexes(&mut self, to: u64) {
        for service in self.services.values_mut() {
            service.create_index = service.create_index.min(to);
            service.modify_index = service.modify_index.min(to);
        }
        for check in self.checks.values_mut() {
            check.create_index = check.create_index.min(to);
            check.modify_index = check.modify_index.min(to);
        }
        self.name_index
            .values_mut()
            .for_each(|idx| *idx = (*idx).min(to));
        self.index = self.index.min(to);
        self.extinction_index = self.extinction_index.min(to);
        self.node_index = self.node_index.min(to);
    }
}

fn check_json(check: &Check, service_tags: &[String]) -> Value {
    json!({
        "Node": NODE, "CheckID": check.def.id, "Name": check.def.name, "Status": check.status,
        "Notes": check.def.notes, "Output": check.output, "ServiceID": check.service_id,
        "ServiceName": check.service_name, "ServiceTags": service_tags,
        "Type": if check.def.ttl.is_some() { "ttl" } else { "" }, "Definition": {},
        "CreateIndex": check.create_index, "ModifyIndex": check.modify_index,
    })
}

impl State {
    /// Registers (or re-registers) a service and its checks.
    pub(crate) fn register_service(&mut self, reg: Registration, now: Instant) {
        let id = reg.service.id.clone();
        let old = self.catalog.services.get(&id).cloned();
        let removed: Vec<String> = if reg.replace_existing_checks {
            let old_checks = self.catalog.checks.values().filter(|c| c.service_id == id);
            let kept = |c: &&Check| reg.checks.iter().any(|d| d.id == c.def.id);
            old_checks
                .filter(|c| !kept(c))
                .map(|c| c.def.id.clone())
                .collect()
        } else {
            Vec::new()
        };
        let unchanged = old.as_ref().is_some_and(|o| o.def == reg.service)
            && removed.is_empty()
            && reg.checks.iter().all(|d| {
                let existing = self.catalog.checks.get(&d.id);
                existing.is_some_and(|c| c.def == *d && c.service_id == id)
            });
        if unchanged {
            // Anti-entropy finds nothing to sync; only the TTL clocks restart.
            for def in &reg.checks {
                if let Some(check) = self.catalog.checks.get_mut(&def.id) {
                    check.ttl_deadline = def.ttl.map(|ttl| now + ttl);
                }
            }
            return;
        }
        let idx = self.bump();
        let catalog = &mut self.catalog;
        for check_id in &removed {
            catalog.checks.remove(check_id);
        }
        for def in reg.checks {
            // Like the agent's check-state snapshot: a re-registered check keeps its status.
            let prev = catalog.checks.remove(&def.id);
            let status = prev
                .as_ref()
                .map_or_else(|| def.status.clone(), |p| p.status.clone());
            let critical_since = match &prev {
                Some(p) if p.status == CRITICAL => p.critical_since,
                _ => (status == CRITICAL).then_some(now),
            };
            let check = Check {
                service_id: id.clone(),
                service_name: reg.service.name.clone(),
                status,
                output: prev.as_ref().map(|p| p.output.clone()).unwrap_or_default(),
                ttl_deadline: def.ttl.map(|ttl| now + ttl),
                ttl_output: prev
                    .as_ref()
                    .map(|p| p.ttl_output.clone())
                    .unwrap_or_default(),
                critical_since,
                create_index: prev.as_ref().map_or(idx, |p| p.create_index),
                modify_index: idx,
                def,
            };
            catalog.checks.insert(check.def.id.clone(), check);
        }
        let create_index = old.as_ref().map_or(idx, |o| o.create_index);
        let name = reg.service.name.clone();
        let service = Service {
            def: reg.service,
            create_index,
            modify_index: idx,
        };
        catalog.services.insert(id, service);
        catalog.touch(&name, idx);
        if let Some(old) = old.filter(|o| o.def.name != name) {
            catalog.touch(&old.def.name, idx);
        }
    }

    /// Deregisters a service and its checks; false if there was no such service.
    pub(crate) fn deregister_service(&mut self, id: &str) -> bool {
        let Some(service) = self.catalog.services.remove(id) else {
            return false;
        };
        let idx = self.bump();
        self.catalog.checks.retain(|_, c| c.service_id != id);
        self.catalog.touch(&service.def.name, idx);
        true
    }

    /// A TTL check update (`pass`, `warn`, `fail`, `update`): sets status and output and
    /// restarts the TTL clock.
    pub(crate) fn update_ttl_check(
        &mut self,
        id: &str,
        status: &str,
        output: String,
        now: Instant,
    ) -> Result<(), CheckUpdateError> {
        let check = self
            .catalog
            .checks
            .get_mut(id)
            .ok_or(CheckUpdateError::Unknown)?;
        let ttl = check.def.ttl.ok_or(CheckUpdateError::NotTtl)?;
        check.ttl_deadline = Some(now + ttl);
        check.ttl_output.clone_from(&output);
        self.set_check_status(id, status, output, now);
        Ok(())
    }

    /// Sets a check's status and output; only a status change moves indexes.
    fn set_check_status(&mut self, id: &str, status: &str, output: String, now: Instant) {
        let changed = self
            .catalog
            .checks
            .get(id)
            .is_some_and(|c| c.status != status);
        let idx = changed.then(|| self.bump());
        let Some(check) = self.catalog.checks.get_mut(id) else {
            return;
        };
        check.output = output;
        if let Some(idx) = idx {
            check.status = status.to_owned();
            check.critical_since = (status == CRITICAL).then_some(now);
            check.modify_index = idx;
            let name = check.service_name.clone();
            self.catalog.touch(&name, idx);
        }
    }

    /// Lapses TTL checks and deregisters services critical for longer than their
    /// `DeregisterCriticalServiceAfter`. Returns whether anything changed.
    pub(crate) fn reap_checks(&mut self, now: Instant) -> bool {
        let lapsed: Vec<(String, String)> = self
            .catalog
            .checks
            .values_mut()
            .filter(|c| c.ttl_deadline.is_some_and(|at| at <= now))
            .map(|c| {
                c.ttl_deadline = None;
                let output = match c.ttl_output.as_str() {
                    "" => "TTL expired".to_owned(),
                    last => format!("TTL expired (last output before timeout follows): {last}"),
                };
                (c.def.id.clone(), output)
            })
            .collect();
        for (id, output) in &lapsed {
            tracing::debug!(check = %id, "fake-consul: check TTL lapsed");
            self.set_check_status(id, CRITICAL, output.clone(), now);
        }
        let mut doomed: Vec<String> = self
            .catalog
            .checks
            .values()
            .filter(|c| match (c.def.deregister_after, c.critical_since) {
                (Some(after), Some(since)) => now.duration_since(since) >= after,
                _ => false,
            })
            .map(|c| c.service_id.clone())
            .collect();
        doomed.sort();
        doomed.dedup();
        for id in &doomed {
            tracing::debug!(service = %id, "fake-consul: deregistering critical service");
            self.deregister_service(id);
        }
        !lapsed.is_empty() || !doomed.is_empty()
    }
}
