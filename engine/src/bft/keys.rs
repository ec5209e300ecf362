//! Key material of BFT mode as text: one secret-key file per replica and one cluster file
//! listing every replica's public key. Parsing and formatting only: reading and writing the
//! files (and drawing the random seeds) is the caller's (`percore keygen` in `shards`).
//!
//! ```text
//! # replica-0.key (mode 0600)            # cluster.keys
//! percore-bft-secret-key v1              percore-bft-cluster v1
//! replica 0                              faults 1
//! secret <64 hex digits>                 replica 0 <64 hex digits of the public key>
//!                                        replica 1 ...
//! # client-1.key (mode 0600)             client 1 <64 hex digits of the public key>
//! percore-bft-client-key v1              client 2 ...
//! client 1
//! secret <64 hex digits>
//! ```
//!
//! Blank lines and lines starting with `#` are ignored. A cluster file is refused if its
//! replica count cannot tolerate its `faults` (`n >= 3f + 1`), if a key is not a valid
//! ed25519 point or is a weak (small-order) one, or if two replicas (or two clients) share
//! a key. Client `c` is the `c`-th client line (ids 1, 2, …, in order): a client's id is
//! bound to its key ([`super::request`]).

use ed25519_dalek::{SECRET_KEY_LENGTH, SigningKey, VerifyingKey};

use super::request::CLIENTS_MAX;
use super::{BftError, REPLICA_COUNT_MAX, check_fault_model};

/// First line of a secret-key file.
pub const SECRET_KEY_HEADER: &str = "percore-bft-secret-key v1";
/// First line of a cluster file.
pub const CLUSTER_HEADER: &str = "percore-bft-cluster v1";
/// First line of a client's secret-key file.
pub const CLIENT_KEY_HEADER: &str = "percore-bft-client-key v1";

/// A malformed key file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The first meaningful line is not the expected header.
    #[error("not a {expected:?} file")]
    Header {
        /// The header expected.
        expected: &'static str,
    },
    /// A line is not `key value…` as expected.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A key is not 64 hex digits.
    #[error("line {line}: a key is 64 hex digits")]
    Hex {
        /// 1-based line number.
        line: usize,
    },
    /// A public key is not a valid curve point, or is a weak one.
    #[error("replica {replica}: invalid or weak ed25519 public key")]
    BadPublicKey {
        /// The replica.
        replica: u8,
    },
    /// A client's public key is not a valid curve point, is a weak one, or is another
    /// client's.
    #[error("client {client}: invalid, weak or duplicate ed25519 public key")]
    BadClientKey {
        /// The client id.
        client: u128,
    },
    /// Two replicas list the same public key.
    #[error("replicas {first} and {second} share a public key")]
    DuplicateKey {
        /// One replica.
        first: u8,
        /// The other.
        second: u8,
    },
    /// A required line is missing.
    #[error("missing {0:?} line")]
    Missing(&'static str),
    /// The replicas and the fault bound do not make a BFT configuration.
    #[error(transparent)]
    FaultModel(#[from] BftError),
}

/// A replica's secret key file: who it is and its signing key.
#[derive(Debug, Clone)]
pub struct SecretKeyFile {
    /// The replica index.
    pub replica: u8,
    /// The ed25519 signing key.
    pub key: SigningKey,
}

/// The cluster file: the fault bound, every replica's public key, index order, and the
/// authorised clients' public keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterKeys {
    /// Byzantine replicas tolerated.
    pub faults_max: u8,
    /// Public keys, replica `i` at index `i`.
    pub keys: Vec<VerifyingKey>,
    /// Public keys of the clients allowed to submit requests: client id `c` at index
    /// `c - 1`.
    pub clients: Vec<VerifyingKey>,
}

/// A client's secret key file: its id and its signing key.
#[derive(Debug, Clone)]
pub struct ClientKeyFile {
    /// The client id (its line in the cluster file).
    pub client: u128,
    /// The ed25519 signing key.
    pub key: SigningKey,
}

/// Formats a secret-key file.
pub fn format_secret_key(replica: u8, key: &SigningKey) -> String {
    format!(
        "{SECRET_KEY_HEADER}\nreplica {replica}\nsecret {}\n",
        hex(&key.to_bytes())
    )
}

/// Formats a cluster file.
pub fn format_cluster(cluster: &ClusterKeys) -> String {
    let mut text = format!("{CLUSTER_HEADER}\nfaults {}\n", cluster.faults_max);
    for (replica, key) in cluster.keys.iter().enumerate() {
        text.push_str(&format!("replica {replica} {}\n", hex(key.as_bytes())));
    }
    for (index, key) in cluster.clients.iter().enumerate() {
        text.push_str(&format!("client {} {}\n", index + 1, hex(key.as_bytes())));
    }
    text
}

/// Formats a client's secret-key file.
pub fn format_client_key(client: u128, key: &SigningKey) -> String {
    format!(
        "{CLIENT_KEY_HEADER}\nclient {client}\nsecret {}\n",
        hex(&key.to_bytes())
    )
}

/// Parses a client's secret-key file.
pub fn parse_client_key(text: &str) -> Result<ClientKeyFile, KeyFileError> {
    let mut lines = meaningful_lines(text);
    expect_header(&mut lines, CLIENT_KEY_HEADER)?;
    let mut client = None;
    let mut secret = None;
    for (line, words) in lines {
        match words.as_slice() {
            ["client", id] => client = Some(parse_client(id, line)?),
            ["secret", digits] => secret = Some(parse_hex(digits, line)?),
            _ => {
                return Err(KeyFileError::Line {
                    line,
                    reason: "expected `client N` or `secret HEX`",
                });
            }
        }
    }
    let client = client.ok_or(KeyFileError::Missing("client"))?;
    let secret = secret.ok_or(KeyFileError::Missing("secret"))?;
    Ok(ClientKeyFile {
        client,
        key: SigningKey::from_bytes(&secret),
    })
}

/// Parses a secret-key file.
pub fn parse_secret_key(text: &str) -> Result<SecretKeyFile, KeyFileError> {
    let mut lines = meaningful_lines(text);
    expect_header(&mut lines, SECRET_KEY_HEADER)?;
    let mut replica = None;
    let mut secret = None;
    for (line, words) in lines {
        match words.as_slice() {
            ["replica", index] => replica = Some(parse_replica(index, line)?),
            ["secret", digits] => secret = Some(parse_hex(digits, line)?),
            _ => {
                return Err(KeyFileError::Line {
                    line,
                    reason: "expected `replica N` or `secret HEX`",
                });
            }
        }
    }
    let replica = replica.ok_or(KeyFileError::Missing("replica"))?;
    let secret = secret.ok_or(KeyFileError::Missing("secret"))?;
    Ok(SecretKeyFile {
        replica,
        key: SigningKey::from_bytes(&secret),
    })
}

/// Parses a cluster file, refusing configurations that cannot tolerate their `faults`.
pub fn parse_cluster(text: &str) -> Result<ClusterKeys, KeyFileError> {
    let mut lines = meaningful_lines(text);
    expect_header(&mut lines, CLUSTER_HEADER)?;
    let mut faults_max = None;
    let mut keys: Vec<VerifyingKey> = Vec::new();
    let mut clients: Vec<VerifyingKey> = Vec::new();
    for (line, words) in lines {
        match words.as_slice() {
            ["faults", count] => {
                faults_max = Some(count.parse::<u8>().map_err(|_| KeyFileError::Line {
                    line,
                    reason: "faults is a small number",
                })?);
            }
            ["replica", index, digits] => {
                let replica = parse_replica(index, line)?;
                if usize::from(replica) != keys.len() {
                    return Err(KeyFileError::Line {
                        line,
                        reason: "replicas must be listed 0, 1, 2, … in order",
                    });
                }
                let bytes = parse_hex(digits, line)?;
                let key = VerifyingKey::from_bytes(&bytes)
                    .map_err(|_| KeyFileError::BadPublicKey { replica })?;
                if key.is_weak() {
                    return Err(KeyFileError::BadPublicKey { replica });
                }
                if let Some(first) = keys.iter().position(|other| *other == key) {
                    return Err(KeyFileError::DuplicateKey {
                        first: first as u8,
                        second: replica,
                    });
                }
                keys.push(key);
            }
            ["client", id, digits] => {
                let client = parse_client(id, line)?;
                if client != clients.len() as u128 + 1 {
                    return Err(KeyFileError::Line {
                        line,
                        reason: "clients must be listed 1, 2, 3, … in order",
                    });
                }
                let bytes = parse_hex(digits, line)?;
                let key = VerifyingKey::from_bytes(&bytes)
                    .ok()
                    .filter(|key| !key.is_weak() && !clients.contains(key))
                    .ok_or(KeyFileError::BadClientKey { client })?;
                clients.push(key);
            }
            _ => {
                return Err(KeyFileError::Line {
                    line,
                    reason: "expected `faults F`, `replica N HEX` or `client N HEX`",
                });
            }
        }
    }
    let faults_max = faults_max.ok_or(KeyFileError::Missing("faults"))?;
    check_fault_model(keys.len(), faults_max)?;
    Ok(ClusterKeys {
        faults_max,
        keys,
        clients,
    })
}

fn meaningful_lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.split_whitespace().collect::<Vec<_>>()))
        .filter(|(_, words)| words.first().is_some_and(|word| !word.starts_with('#')))
}

fn expect_header<'a>(
    lines: &mut impl Iterator<Item = (usize, Vec<&'a str>)>,
    expected: &'static str,
) -> Result<(), KeyFileError> {
    match lines.next() {
        Some((_, words)) if words.join(" ") == expected => Ok(()),
        _ => Err(KeyFileError::Header { expected }),
    }
}

fn parse_replica(text: &str, line: usize) -> Result<u8, KeyFileError> {
    match text.parse::<u8>() {
        Ok(replica) if usize::from(replica) < REPLICA_COUNT_MAX => Ok(replica),
        _ => Err(KeyFileError::Line {
            line,
            reason: "replica index out of range",
        }),
    }
}

fn parse_client(text: &str, line: usize) -> Result<u128, KeyFileError> {
    match text.parse::<u128>() {
        Ok(client) if client >= 1 && client <= CLIENTS_MAX as u128 => Ok(client),
        _ => Err(KeyFileError::Line {
            line,
            reason: "client id out of range",
        }),
    }
}

fn parse_hex(text: &str, line: usize) -> Result<[u8; SECRET_KEY_LENGTH], KeyFileError> {
    let digits = text.as_bytes();
    if digits.len() != 2 * SECRET_KEY_LENGTH {
        return Err(KeyFileError::Hex { line });
    }
    let mut bytes = [0u8; SECRET_KEY_LENGTH];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        let high = (pair[0] as char)
            .to_digit(16)
            .ok_or(KeyFileError::Hex { line })?;
        let low = (pair[1] as char)
            .to_digit(16)
            .ok_or(KeyFileError::Hex { line })?;
        *byte = (high * 16 + low) as u8;
    }
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(seeds: &[[u8; 32]], faults_max: u8) -> ClusterKeys {
        ClusterKeys {
            faults_max,
            keys: seeds
                .iter()
                .map(|seed| SigningKey::from_bytes(seed).verifying_key())
                .collect(),
            clients: Vec::new(),
        }
    }

    #[test]
    fn bft_key_files_round_trip() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let parsed = parse_secret_key(&format_secret_key(3, &key)).expect("secret key");
        assert_eq!(parsed.replica, 3);
        assert_eq!(parsed.key.to_bytes(), key.to_bytes());
        let mut keys = cluster(&[[1; 32], [2; 32], [3; 32], [4; 32]], 1);
        assert_eq!(parse_cluster(&format_cluster(&keys)), Ok(keys.clone()));
        keys.clients = [[5; 32], [6; 32]]
            .iter()
            .map(|seed| SigningKey::from_bytes(seed).verifying_key())
            .collect();
        assert_eq!(parse_cluster(&format_cluster(&keys)), Ok(keys.clone()));
        let client = parse_client_key(&format_client_key(2, &key)).expect("client key");
        assert_eq!(client.client, 2);
        assert_eq!(client.key.to_bytes(), key.to_bytes());
        // Client ids are the lines' order, from 1: no gaps, no id 0, no shared keys.
        let text = format_cluster(&keys);
        let client_one = hex(keys.clients[0].as_bytes());
        assert!(matches!(
            parse_cluster(&text.replace("client 2 ", "client 3 ")),
            Err(KeyFileError::Line { .. })
        ));
        assert!(matches!(
            parse_cluster(&text.replace("client 1 ", "client 0 ")),
            Err(KeyFileError::Line { .. })
        ));
        assert_eq!(
            parse_cluster(&format!("{text}client 3 {client_one}\n")),
            Err(KeyFileError::BadClientKey { client: 3 })
        );
        assert!(matches!(
            parse_client_key("percore-bft-client-key v1\nclient 0\n"),
            Err(KeyFileError::Line { .. })
        ));
    }

    #[test]
    fn bft_cluster_file_refuses_too_few_replicas() {
        let keys = cluster(&[[1; 32], [2; 32], [3; 32]], 1);
        let error = parse_cluster(&format_cluster(&keys)).unwrap_err();
        assert_eq!(
            error,
            KeyFileError::FaultModel(BftError::TooFewReplicas {
                replica_count: 3,
                faults_max: 1
            })
        );
        assert!(error.to_string().contains("3f + 1"), "{error}");
    }

    #[test]
    fn bft_cluster_file_refuses_bad_keys() {
        let mut keys = cluster(&[[1; 32], [2; 32], [3; 32], [1; 32]], 1);
        assert_eq!(
            parse_cluster(&format_cluster(&keys)),
            Err(KeyFileError::DuplicateKey {
                first: 0,
                second: 3
            })
        );
        keys.keys.truncate(3);
        let mut text = format_cluster(&keys);
        // The identity point (small order): a weak key anyone can forge signatures for.
        text.push_str(
            "replica 3 0100000000000000000000000000000000000000000000000000000000000000\n",
        );
        assert_eq!(
            parse_cluster(&text),
            Err(KeyFileError::BadPublicKey { replica: 3 })
        );
        assert_eq!(
            parse_cluster("percore-bft-cluster v1\nfaults 1\nreplica 0 zz\n"),
            Err(KeyFileError::Hex { line: 3 })
        );
        assert!(matches!(
            parse_secret_key("nope"),
            Err(KeyFileError::Header { .. })
        ));
    }
}
