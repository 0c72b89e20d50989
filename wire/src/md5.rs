//! MD5 password authentication (AuthenticationMD5Password).
//!
//! The stored secret is `"md5" + hex(md5(password + user))`; the client's
//! response to a 4-byte salt is `"md5" + hex(md5(hex_part_of_secret + salt))`.

use ::md5::{Digest, Md5};

fn hex32(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(3 + digest.len() * 2);
    s.push_str("md5");
    for b in digest {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

/// The secret PostgreSQL stores with `password_encryption = md5`.
pub fn md5_secret(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    hex32(&h.finalize())
}

/// The PasswordMessage content answering `salt`, from a stored secret (with
/// or without its `md5` prefix).
pub fn md5_response(secret: &str, salt: [u8; 4]) -> String {
    let hex = secret.strip_prefix("md5").unwrap_or(secret);
    let mut h = Md5::new();
    h.update(hex.as_bytes());
    h.update(salt);
    hex32(&h.finalize())
}

/// Checks a client's response (PasswordMessage content without the NUL) in
/// constant time.
pub fn verify_md5(secret: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let expected = md5_response(secret, salt);
    crate::scram::ct_eq(expected.as_bytes(), response)
}

/// Checks a cleartext password against a stored md5 secret, in constant
/// time.
pub fn verify_password(secret: &str, user: &str, password: &str) -> bool {
    crate::scram::ct_eq(md5_secret(user, password).as_bytes(), secret.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleartext_password_against_a_secret() {
        let secret = md5_secret("alice", "s3cret");
        assert!(verify_password(&secret, "alice", "s3cret"));
        assert!(!verify_password(&secret, "bob", "s3cret"));
        assert!(!verify_password(&secret, "alice", "s3cret!"));
    }

    #[test]
    fn postgres_secret() {
        // What PostgreSQL 15 stores for password_encryption = md5.
        assert_eq!(
            md5_secret("postgres", "postgres"),
            "md53175bce1d3201d16594cebf9d7eb3f9d"
        );
        // Recorded from PostgreSQL 15: CREATE ROLE bob PASSWORD 'postgres'.
        assert_eq!(
            md5_secret("bob", "postgres"),
            "md565170a859842ceb2930dc2fa1454af9d"
        );
    }

    #[test]
    fn recorded_postgres_login() {
        // PostgreSQL 15 sent this salt to bob (password "postgres") and
        // accepted this response.
        let salt = [194, 205, 105, 232];
        let resp = "md587d89460988c3b59321ac22dbf40e1ef";
        assert_eq!(md5_response(&md5_secret("bob", "postgres"), salt), resp);
        assert!(verify_md5(
            "md565170a859842ceb2930dc2fa1454af9d",
            salt,
            resp.as_bytes()
        ));
    }

    #[test]
    fn response_and_verify() {
        let secret = md5_secret("postgres", "postgres");
        let salt = [0x01, 0x02, 0x03, 0x04];
        let resp = md5_response(&secret, salt);
        assert_eq!(resp.len(), 35);
        assert!(resp.starts_with("md5"));
        assert_eq!(resp, md5_response(&secret[3..], salt));
        // Independent computation: md5(hex(md5(pw+user)) + salt).
        let mut h = Md5::new();
        h.update(b"3175bce1d3201d16594cebf9d7eb3f9d");
        h.update(salt);
        assert_eq!(resp[3..], hex32(&h.finalize())[3..]);

        assert!(verify_md5(&secret, salt, resp.as_bytes()));
        assert!(!verify_md5(&secret, [0, 2, 3, 4], resp.as_bytes()));
        assert!(!verify_md5(&secret, salt, &resp.as_bytes()[..34]));
        assert!(!verify_md5(&secret, salt, b""));
        let wrong = md5_response(&md5_secret("postgres", "wrong"), salt);
        assert!(!verify_md5(&secret, salt, wrong.as_bytes()));
    }
}
