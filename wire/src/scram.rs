//! SCRAM-SHA-256 (RFC 5802 with RFC 7677's hash): the messages of Shoal's
//! authentication exchange, for both ends, as pure functions over bytes.
//!
//! Here because the broker and every client speak it, and like the rest of
//! this crate it does no I/O: the caller carries each message in a
//! `SaslAuthenticateRequest`/`Response` (`wire/PROTOCOL.md`). The
//! primitives come from the RustCrypto crates (`sha2`, `hmac`, `pbkdf2`);
//! proofs and signatures are compared in constant time (`subtle`).
//!
//! What is (and is not) supported:
//! - channel binding: `n,,` only (the client neither wants nor offers it);
//!   no authorization identity (`a=`), no extensions;
//! - user names: 1 to 64 characters of `A-Z a-z 0-9 . _ - @` — SASLprep is
//!   the identity on them, and `,` and `=` never need escaping. Other names
//!   are refused, never normalised;
//! - passwords: their UTF-8 bytes as given (SASLprep is the identity on
//!   printable ASCII; other passwords are not normalised, so a client in
//!   another language must send the same bytes).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// The one mechanism Shoal speaks.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// RFC 7677's minimum iteration count.
pub const ITERATIONS_MIN: u32 = 4096;
/// Iterations of credentials the client makes (PBKDF2 rounds per login on
/// both ends; more makes a stolen credential dearer to crack and every
/// login slower).
pub const ITERATIONS_DEFAULT: u32 = 8192;
/// Refused above this: a client must not make the broker spin.
pub const ITERATIONS_MAX: u32 = 1_000_000;
/// Longest user name.
pub const USERNAME_BYTES_MAX: usize = 64;
/// Longest SCRAM message either end accepts.
pub const MESSAGE_BYTES_MAX: usize = 1024;
const NONCE_RANDOM_BYTES: usize = 18;
const SALT_BYTES: usize = 16;
const GS2_HEADER: &str = "n,,";
/// `c=` of the client-final message: base64 of the GS2 header `n,,`.
const CHANNEL_BINDING: &str = "biws";

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("invalid user name: 1 to 64 characters of A-Z a-z 0-9 . _ - @")]
    InvalidUsername,
    #[error("channel binding is not supported (the GS2 header must be \"n,,\")")]
    ChannelBinding,
    #[error("the nonce does not continue this exchange's nonce")]
    NonceMismatch,
    #[error("iteration count {0} outside {ITERATIONS_MIN}..={ITERATIONS_MAX}")]
    Iterations(u32),
    #[error("the client proof is wrong")]
    BadProof,
    #[error("the server's signature is wrong: it does not know the password")]
    BadServerSignature,
    #[error("the server refused: {0}")]
    ServerError(String),
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

pub type Result<T> = std::result::Result<T, ScramError>;

/// Checks a user name (see the module doc).
pub fn validate_username(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= USERNAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(ScramError::InvalidUsername)
    }
}

/// What a server keeps of a password: never the password, nor anything a
/// client could log in with.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
    out
}

/// `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).map_err(|e| ScramError::Random(e.to_string()))?;
    Ok(b)
}

/// A fresh nonce: printable, without commas.
pub fn new_nonce() -> Result<String> {
    Ok(B64.encode(random_bytes(NONCE_RANDOM_BYTES)?))
}

fn check_iterations(i: u32) -> Result<()> {
    if (ITERATIONS_MIN..=ITERATIONS_MAX).contains(&i) {
        Ok(())
    } else {
        Err(ScramError::Iterations(i))
    }
}

impl Credential {
    /// The credential of `password` with this salt and iteration count.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Result<Credential> {
        check_iterations(iterations)?;
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        Ok(Credential {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        })
    }

    /// The credential of `password` with a fresh random salt.
    pub fn generate(password: &str, iterations: u32) -> Result<Credential> {
        Credential::derive(password, &random_bytes(SALT_BYTES)?, iterations)
    }

    /// Checks what a peer sent (e.g. in `CreateUserRequest`).
    pub fn from_parts(
        salt: &[u8],
        iterations: u32,
        stored_key: &[u8],
        server_key: &[u8],
    ) -> Result<Credential> {
        check_iterations(iterations)?;
        if salt.is_empty() || salt.len() > 256 {
            return Err(ScramError::Malformed("salt of 1 to 256 bytes expected"));
        }
        let key = |k: &[u8]| -> Result<[u8; 32]> {
            k.try_into()
                .map_err(|_| ScramError::Malformed("keys are 32 bytes"))
        };
        Ok(Credential {
            salt: salt.to_vec(),
            iterations,
            stored_key: key(stored_key)?,
            server_key: key(server_key)?,
        })
    }
}

fn utf8(msg: &[u8]) -> Result<&str> {
    if msg.len() > MESSAGE_BYTES_MAX {
        return Err(ScramError::Malformed("message too long"));
    }
    std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))
}

/// The value of attribute `key` (`k=value`) in a message field.
fn attr(field: Option<&str>, key: char) -> Result<&str> {
    let f = field.ok_or(ScramError::Malformed("a field is missing"))?;
    let mut chars = f.chars();
    match (chars.next(), chars.next()) {
        (Some(k), Some('=')) if k == key => Ok(&f[2..]),
        _ => Err(ScramError::Malformed("unexpected attribute")),
    }
}

fn printable_nonce(n: &str) -> Result<()> {
    if n.is_empty() || !n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
        return Err(ScramError::Malformed("bad nonce"));
    }
    Ok(())
}

// ---- client ------------------------------------------------------------------

/// A client's side of one exchange, after it sent the client-first message.
pub struct ScramClient {
    password: String,
    client_nonce: String,
    client_first_bare: String,
}

/// The client after the client-final message: the server's signature it
/// expects.
pub struct ScramClientFinal {
    server_signature: [u8; 32],
}

impl ScramClient {
    /// Starts an exchange: the client and its client-first message.
    pub fn new(user: &str, password: &str) -> Result<(ScramClient, String)> {
        ScramClient::with_nonce(user, password, &new_nonce()?)
    }

    /// [`ScramClient::new`] with a given nonce (tests, test vectors).
    pub fn with_nonce(user: &str, password: &str, nonce: &str) -> Result<(ScramClient, String)> {
        validate_username(user)?;
        printable_nonce(nonce)?;
        let bare = format!("n={user},r={nonce}");
        let first = format!("{GS2_HEADER}{bare}");
        Ok((
            ScramClient {
                password: password.to_string(),
                client_nonce: nonce.to_string(),
                client_first_bare: bare,
            },
            first,
        ))
    }

    /// Answers the server-first message with the client-final message.
    pub fn server_first(self, msg: &[u8]) -> Result<(ScramClientFinal, String)> {
        let msg = utf8(msg)?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let mut fields = msg.split(',');
        let nonce = attr(fields.next(), 'r')?;
        let salt = attr(fields.next(), 's')?;
        let iterations = attr(fields.next(), 'i')?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        printable_nonce(nonce)?;
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramError::Malformed("iteration count"))?;
        check_iterations(iterations)?;
        let salted = salted_password(&self.password, &salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c={CHANNEL_BINDING},r={nonce}");
        let auth = [
            self.client_first_bare.as_bytes(),
            b",",
            msg.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let signature = hmac(&stored_key, &auth);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        let server_key = hmac(&salted, &[b"Server Key"]);
        Ok((
            ScramClientFinal {
                server_signature: hmac(&server_key, &auth),
            },
            format!("{without_proof},p={}", B64.encode(proof)),
        ))
    }
}

impl ScramClientFinal {
    /// Checks the server-final message: the server proved it knows the
    /// credential (a server that does not cannot sign).
    pub fn server_final(&self, msg: &[u8]) -> Result<()> {
        let msg = utf8(msg)?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let v = attr(msg.split(',').next(), 'v')?;
        let sig = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("signature is not base64"))?;
        if bool::from(sig.ct_eq(&self.server_signature)) {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

// ---- server ------------------------------------------------------------------

/// A parsed client-first message: who asks, before the server looks the
/// user up.
#[derive(Debug)]
pub struct ClientFirst {
    pub username: String,
    client_nonce: String,
    bare: String,
}

impl ClientFirst {
    pub fn parse(msg: &[u8]) -> Result<ClientFirst> {
        let msg = utf8(msg)?;
        let Some(bare) = msg.strip_prefix(GS2_HEADER) else {
            return Err(if msg.starts_with("p=") || msg.starts_with("y,") {
                ScramError::ChannelBinding
            } else {
                ScramError::Malformed("the GS2 header must be \"n,,\"")
            });
        };
        let mut fields = bare.split(',');
        let user = attr(fields.next(), 'n')?;
        let nonce = attr(fields.next(), 'r')?;
        if fields.next().is_some() {
            return Err(ScramError::Malformed("extensions are not supported"));
        }
        validate_username(user)?;
        printable_nonce(nonce)?;
        Ok(ClientFirst {
            username: user.to_string(),
            client_nonce: nonce.to_string(),
            bare: bare.to_string(),
        })
    }

    /// The server-first message for this user's credential, with a fresh
    /// server nonce appended to the client's.
    pub fn respond(self, cred: &Credential) -> Result<(ScramServer, String)> {
        self.respond_with_nonce(cred, &new_nonce()?)
    }

    /// [`ClientFirst::respond`] with a given server nonce (test vectors).
    pub fn respond_with_nonce(
        self,
        cred: &Credential,
        server_nonce: &str,
    ) -> Result<(ScramServer, String)> {
        printable_nonce(server_nonce)?;
        let nonce = format!("{}{server_nonce}", self.client_nonce);
        let first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&cred.salt),
            cred.iterations
        );
        Ok((
            ScramServer {
                auth_prefix: format!("{},{first}", self.bare),
                nonce,
                stored_key: cred.stored_key,
                server_key: cred.server_key,
            },
            first,
        ))
    }
}

/// The server's side of one exchange, after it sent server-first.
pub struct ScramServer {
    auth_prefix: String,
    nonce: String,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramServer {
    /// Verifies the client-final message; on success, the server-final
    /// message. A client-final of an earlier exchange carries that
    /// exchange's nonce and is refused ([`ScramError::NonceMismatch`]).
    pub fn client_final(&self, msg: &[u8]) -> Result<String> {
        let msg = utf8(msg)?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut fields = without_proof.split(',');
        let cb = attr(fields.next(), 'c')?;
        let nonce = attr(fields.next(), 'r')?;
        if fields.next().is_some() {
            return Err(ScramError::Malformed("extensions are not supported"));
        }
        if cb != CHANNEL_BINDING {
            return Err(ScramError::ChannelBinding);
        }
        if !bool::from(nonce.as_bytes().ct_eq(self.nonce.as_bytes())) {
            return Err(ScramError::NonceMismatch);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let proof: [u8; 32] = proof
            .as_slice()
            .try_into()
            .map_err(|_| ScramError::Malformed("proof is not 32 bytes"))?;
        let auth = [self.auth_prefix.as_bytes(), b",", without_proof.as_bytes()];
        let signature = hmac(&self.stored_key, &auth);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(stored.ct_eq(&self.stored_key)) {
            return Err(ScramError::BadProof);
        }
        Ok(format!("v={}", B64.encode(hmac(&self.server_key, &auth))))
    }
}

/// base64 (standard alphabet), for records that keep credentials as text.
pub fn b64_encode(b: &[u8]) -> String {
    B64.encode(b)
}

pub fn b64_decode(s: &str) -> Result<Vec<u8>> {
    B64.decode(s)
        .map_err(|_| ScramError::Malformed("not base64"))
}

/// A keyed hash (HMAC-SHA-256), for callers that need a stable secret
/// derivation (e.g. a plausible salt for a user that does not exist).
pub fn keyed_hash(key: &[u8], data: &[u8]) -> [u8; 32] {
    hmac(key, &[data])
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677, section 3.
    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_credential() -> Credential {
        static CRED: std::sync::LazyLock<Credential> = std::sync::LazyLock::new(|| {
            let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
            Credential::derive("pencil", &salt, 4096).unwrap()
        });
        CRED.clone()
    }

    #[test]
    fn rfc7677_client() {
        let (c, first) = ScramClient::with_nonce("user", "pencil", CLIENT_NONCE).unwrap();
        assert_eq!(first, CLIENT_FIRST);
        let (fin, client_final) = c.server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(client_final, CLIENT_FINAL);
        fin.server_final(SERVER_FINAL.as_bytes()).unwrap();
        assert_eq!(
            fin.server_final(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::BadServerSignature)
        );
    }

    #[test]
    fn rfc7677_server() {
        let first = ClientFirst::parse(CLIENT_FIRST.as_bytes()).unwrap();
        assert_eq!(first.username, "user");
        let (s, server_first) = first
            .respond_with_nonce(&rfc_credential(), SERVER_NONCE)
            .unwrap();
        assert_eq!(server_first, SERVER_FIRST);
        assert_eq!(
            s.client_final(CLIENT_FINAL.as_bytes()).unwrap(),
            SERVER_FINAL
        );
    }

    #[test]
    fn wrong_password_and_replay_are_refused() {
        let cred = Credential::generate("right", ITERATIONS_MIN).unwrap();
        let exchange = |password: &str| {
            let (c, first) = ScramClient::new("alice", password).unwrap();
            let (s, sf) = ClientFirst::parse(first.as_bytes())
                .unwrap()
                .respond(&cred)
                .unwrap();
            let (fin, cf) = c.server_first(sf.as_bytes()).unwrap();
            (s, fin, cf)
        };
        let (s, fin, cf) = exchange("right");
        let sfinal = s.client_final(cf.as_bytes()).unwrap();
        fin.server_final(sfinal.as_bytes()).unwrap();
        let (s2, _, cf2) = exchange("wrong");
        assert_eq!(s2.client_final(cf2.as_bytes()), Err(ScramError::BadProof));
        // An old client-final against a new exchange: another nonce.
        let (s3, _, _) = exchange("right");
        assert_eq!(
            s3.client_final(cf.as_bytes()),
            Err(ScramError::NonceMismatch)
        );
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        for m in [
            &b""[..],
            b"n,,",
            b"n,,n=",
            b"n,,n=a",
            b"n,,n=a,r=",
            b"y,,n=a,r=x",
            b"p=tls-unique,,n=a,r=x",
            b"n,a=b,n=a,r=x",
            b"n,,n=a,r=x,m=ext",
            b"n,,n=\xff,r=x",
            b"n,,n=a=2Cb,r=x",
            b"n,,n=\xc3\xa9,r=x",
        ] {
            assert!(ClientFirst::parse(m).is_err(), "{m:?}");
        }
        assert!(ClientFirst::parse(&vec![b'a'; MESSAGE_BYTES_MAX + 1]).is_err());
        let first = ClientFirst::parse(b"n,,n=u,r=abc").unwrap();
        let (s, _) = first.respond(&rfc_credential()).unwrap();
        for m in [
            &b""[..],
            b"c=biws",
            b"c=biws,r=abc,p=",
            b"c=biws,r=abc,p=!!!",
            b"c=eSws,r=abc,p=AAAA",
            b",p=",
        ] {
            assert!(s.client_final(m).is_err(), "{m:?}");
        }
        let (c, _) = ScramClient::new("u", "p").unwrap();
        assert!(c.server_first(b"r=x,s=AAAA,i=4096").is_err());
        let (c, _) = ScramClient::with_nonce("u", "p", "abc").unwrap();
        assert_eq!(
            c.server_first(b"r=abcdef,s=AAAA,i=1").err(),
            Some(ScramError::Iterations(1))
        );
    }

    proptest::proptest! {
        /// Whatever a peer sends, each end answers with an error, never a
        /// panic.
        #[test]
        fn arbitrary_messages_never_panic(msg in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = ClientFirst::parse(&msg);
            let mut first = b"n,,n=u,r=".to_vec();
            first.extend_from_slice(&msg);
            let _ = ClientFirst::parse(&first);
            let (s, _) = ClientFirst::parse(b"n,,n=u,r=abc").unwrap().respond_with_nonce(&rfc_credential(), "xyz").unwrap();
            let _ = s.client_final(&msg);
            let mut fin = b"c=biws,r=abcxyz,p=".to_vec();
            fin.extend_from_slice(&msg);
            proptest::prop_assert!(s.client_final(&fin).is_err());
            let (c, _) = ScramClient::with_nonce("u", "p", "abc").unwrap();
            let _ = c.server_first(&msg);
        }
    }

    #[test]
    fn user_names() {
        for ok in ["a", "alice", "svc.orders-1", "a_b@example.com"] {
            validate_username(ok).unwrap();
        }
        for bad in ["", "a,b", "a=b", "é", "a b", &"x".repeat(65)] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
    }
}
