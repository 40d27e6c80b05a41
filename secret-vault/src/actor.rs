//! The vault's actor: the [`Vault`] core behind a mailbox. Its peers hold refs narrowed to
//! [`VaultQuery`] (the network gateway) or [`VaultControl`] (the control side).
//!
//! Invariants: answers are computed synchronously from the table as it stands when the
//! message is handled, so a rotation handled before a query applies to that query; no
//! value is logged (violations are logged by secret name and location only).

use msb_schema::secret::{VaultControl, VaultQuery};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::vault::Vault;

/// The vault's mailbox.
#[derive(Debug)]
pub enum VaultMsg {
    Query(VaultQuery),
    Control(VaultControl),
}

impl From<VaultQuery> for VaultMsg {
    fn from(q: VaultQuery) -> Self {
        VaultMsg::Query(q)
    }
}

impl TryFrom<VaultMsg> for VaultQuery {
    type Error = ();
    fn try_from(m: VaultMsg) -> Result<Self, ()> {
        match m {
            VaultMsg::Query(q) => Ok(q),
            _ => Err(()),
        }
    }
}

impl From<VaultControl> for VaultMsg {
    fn from(c: VaultControl) -> Self {
        VaultMsg::Control(c)
    }
}

impl TryFrom<VaultMsg> for VaultControl {
    type Error = ();
    fn try_from(m: VaultMsg) -> Result<Self, ()> {
        match m {
            VaultMsg::Control(c) => Ok(c),
            _ => Err(()),
        }
    }
}

/// What the vault starts with.
pub struct VaultArgs {
    pub vault: Vault,
}

pub struct SecretVault;

impl Actor for SecretVault {
    type Msg = VaultMsg;
    type State = Vault;
    type Arguments = VaultArgs;

    async fn pre_start(&self, _me: ActorRef<VaultMsg>, args: VaultArgs) -> Result<Vault, ActorProcessingErr> {
        if !args.vault.all_locked() {
            tracing::warn!(
                "secret values could not be locked in memory (RLIMIT_MEMLOCK too low?): they may be swapped out"
            );
        }
        Ok(args.vault)
    }

    async fn handle(
        &self,
        _me: ActorRef<VaultMsg>,
        msg: VaultMsg,
        vault: &mut Vault,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VaultMsg::Query(VaultQuery::Substitute { flow, head, reply }) => {
                let _ = reply.send(vault.substitute(&flow, head));
            }
            VaultMsg::Query(VaultQuery::Mask { sni, reply }) => {
                let _ = reply.send(vault.mask(&sni));
            }
            VaultMsg::Control(VaultControl::Rotate { name, value, reply }) => {
                let _ = reply.send(vault.rotate(&name, value).map_err(|e| e.to_string()));
            }
            VaultMsg::Control(VaultControl::SetHosts { name, hosts, reply }) => {
                let _ = reply.send(vault.set_hosts(&name, hosts).map_err(|e| e.to_string()));
            }
            VaultMsg::Control(VaultControl::Remove { name, reply }) => {
                let _ = reply.send(vault.remove(&name).map_err(|e| e.to_string()));
            }
            VaultMsg::Control(VaultControl::Describe(reply)) => {
                let _ = reply.send(vault.describe());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msb_schema::secret::*;
    use ractor::{call, DerivedActorRef};
    use zeroize::Zeroizing;

    #[tokio::test]
    async fn narrowed_refs_ask_their_own_questions() {
        let spec = SecretSpec {
            name: SecretName::new("K").unwrap(),
            placeholder: Placeholder::generated(&[9; 26]),
            hosts: vec![SecretHost::parse("api.test").unwrap()],
            scope: SecretScope::default(),
            on_violation: OnViolation::Forward,
            source: SecretSource::Given,
        };
        let ph = spec.placeholder.to_string();
        let vault = Vault::new(vec![(spec, SecretValue::new("K", b"value-one-xyz".to_vec()).unwrap())]).unwrap();
        let (actor, handle) = Actor::spawn(None, SecretVault, VaultArgs { vault }).await.unwrap();
        let query: DerivedActorRef<VaultQuery> = actor.get_derived();
        let control: DerivedActorRef<VaultControl> = actor.get_derived();
        let ask = |query: DerivedActorRef<VaultQuery>, ph: String| async move {
            let head = RequestHead {
                method: "GET".into(),
                target: Zeroizing::new(b"/".to_vec()),
                authority: "api.test".into(),
                headers: vec![("x-key".into(), Zeroizing::new(ph.into_bytes()))],
            };
            let flow = FlowIdentity { sni: "api.test".into(), pinned: true, verified: true };
            let a = call!(query, |reply| VaultQuery::Substitute { flow, head, reply }).unwrap();
            a.rewritten.map(|h| h.headers[0].1.to_vec())
        };
        assert_eq!(ask(query.clone(), ph.clone()).await.as_deref(), Some(b"value-one-xyz".as_slice()));
        let name = SecretName::new("K").unwrap();
        let value = SecretValue::new("K", b"value-two-xyz".to_vec()).unwrap();
        call!(control, |reply| VaultControl::Rotate { name: name.clone(), value, reply }).unwrap().unwrap();
        assert_eq!(ask(query.clone(), ph.clone()).await.as_deref(), Some(b"value-two-xyz".as_slice()));
        call!(control, |reply| VaultControl::Remove { name: name.clone(), reply }).unwrap().unwrap();
        assert_eq!(ask(query.clone(), ph.clone()).await, None);
        actor.stop(None);
        handle.await.unwrap();
    }
}
