//! Authenticating a client to the pooler: SCRAM-SHA-256 (default) or md5,
//! against the secrets computed once from the user's configured password.

use crate::stream::Stream;
use bytes::{BufMut, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use wire::backend::Authentication;
use wire::frame::{split_frame, MAX_AUTH_FRAME_LEN};
use wire::frontend::{self, PASSWORD_TAG};
use wire::scram::{ScramServer, SCRAM_SHA_256};
use wire::WireError;

use crate::config::{ClientAuth, FetchedSecret, TenantConfig, UserAuth, UserConfig};
use crate::error::{EngineError, Refusal};

/// Reads one whole frame from a client during authentication.
pub async fn read_client_frame(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), EngineError> {
    loop {
        if let Some((h, body)) =
            split_frame(buf, MAX_AUTH_FRAME_LEN).map_err(EngineError::ClientProtocol)?
        {
            return Ok((h.tag, body));
        }
        let mut chunk = [0u8; 2048];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(EngineError::ClientIo)?;
        if n == 0 {
            return Err(EngineError::ClientIo(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        buf.put_slice(&chunk[..n]);
    }
}

async fn read_password_frame(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<BytesMut, EngineError> {
    let (tag, body) = read_client_frame(stream, buf).await?;
    if tag != PASSWORD_TAG {
        return Err(EngineError::ClientProtocol(WireError::Protocol(format!(
            "expected a password message, got message type {:?}",
            tag as char
        ))));
    }
    Ok(body)
}

async fn send(stream: &mut Stream, out: &BytesMut) -> Result<(), EngineError> {
    stream.write_all(out).await.map_err(EngineError::ClientIo)
}

/// Runs the authentication exchange; on success the ClientKey recovered from
/// a SCRAM proof is returned and the exchange's last messages (SCRAM's final
/// message, AuthenticationOk) are in `done`, not sent yet: the login sends
/// them with the session's parameters in one write.
/// `inbuf` holds client bytes already read; what is left after it belongs to
/// the session.
pub async fn authenticate(
    stream: &mut Stream,
    inbuf: &mut BytesMut,
    tenant: &TenantConfig,
    user: &UserConfig,
    startup_user: &str,
    cleartext: bool,
    done: &mut BytesMut,
) -> Result<Option<[u8; 32]>, EngineError> {
    let wrong_password = || EngineError::Refused(Refusal::WrongPassword(user.db_user.clone()));
    let mismatch = |what: &str| {
        EngineError::Refused(Refusal::AuthMismatch {
            user: user.db_user.clone(),
            why: what.to_string(),
        })
    };
    if cleartext {
        return cleartext_password(stream, inbuf, user, done).await;
    }
    // Room for the SCRAM server-first message without growing.
    let mut out = BytesMut::with_capacity(256);
    match tenant.client_auth {
        ClientAuth::ScramSha256 => {
            let secret = match &user.auth {
                UserAuth::Password { scram, .. } => scram.clone(),
                UserAuth::Fetched(FetchedSecret::Scram(s)) => s.clone(),
                UserAuth::Fetched(FetchedSecret::Md5(_)) => {
                    return Err(mismatch(
                        "its password is stored as md5; set the tenant's auth_type to md5",
                    ))
                }
            };
            Authentication::Sasl {
                mechanisms: vec![SCRAM_SHA_256.to_string()],
            }
            .encode(&mut out);
            send(stream, &out).await?;
            let body = read_password_frame(stream, inbuf).await?;
            let (mechanism, data) = frontend::decode_sasl_initial_response(&body)
                .map_err(EngineError::ClientProtocol)?;
            if mechanism != SCRAM_SHA_256 {
                return Err(EngineError::ClientProtocol(WireError::Protocol(format!(
                    "unsupported SASL mechanism {mechanism:?}"
                ))));
            }
            let mut server = ScramServer::new(secret);
            let first = server
                .handle_client_first(data)
                .map_err(EngineError::ClientProtocol)?;
            out.clear();
            Authentication::SaslContinue(first.into()).encode(&mut out);
            send(stream, &out).await?;
            let body = read_password_frame(stream, inbuf).await?;
            let (last, client_key) = server.handle_client_final(&body).map_err(|e| match e {
                WireError::AuthFailed => wrong_password(),
                other => EngineError::ClientProtocol(other),
            })?;
            Authentication::SaslFinal(last.into()).encode(done);
            Authentication::Ok.encode(done);
            Ok(Some(client_key))
        }
        ClientAuth::Md5 => {
            // Clients salt md5 with the user name they sent (`user.tenant`).
            let secret = match &user.auth {
                UserAuth::Password { password, .. } => {
                    wire::md5::md5_secret(startup_user, password)
                }
                UserAuth::Fetched(FetchedSecret::Md5(s)) => s.clone(),
                UserAuth::Fetched(FetchedSecret::Scram(_)) => return Err(mismatch(
                    "its password is stored as SCRAM; set the tenant's auth_type to scram-sha-256",
                )),
            };
            let salt: [u8; 4] = rand::random();
            Authentication::Md5Password { salt }.encode(&mut out);
            send(stream, &out).await?;
            let body = read_password_frame(stream, inbuf).await?;
            let response = frontend::decode_password(&body).map_err(EngineError::ClientProtocol)?;
            if !wire::md5::verify_md5(&secret, salt, response) {
                return Err(wrong_password());
            }
            Authentication::Ok.encode(done);
            Ok(None)
        }
    }
}

/// Cleartext password authentication, for WebSocket clients over TLS or
/// from trusted addresses (serverless drivers send the password together
/// with their startup message and first query, without waiting for the
/// server's request). Checked against whatever secret the user has; a
/// SCRAM secret from `auth_query` yields the ClientKey for pass-through.
async fn cleartext_password(
    stream: &mut Stream,
    inbuf: &mut BytesMut,
    user: &UserConfig,
    done: &mut BytesMut,
) -> Result<Option<[u8; 32]>, EngineError> {
    let mut out = BytesMut::new();
    Authentication::CleartextPassword.encode(&mut out);
    send(stream, &out).await?;
    let body = read_password_frame(stream, inbuf).await?;
    let given = frontend::decode_password(&body).map_err(EngineError::ClientProtocol)?;
    let wrong_password = || EngineError::Refused(Refusal::WrongPassword(user.db_user.clone()));
    let given = std::str::from_utf8(given).map_err(|_| wrong_password())?;
    let client_key = match &user.auth {
        UserAuth::Password { password, .. } => {
            if !wire::scram::ct_eq(password.as_bytes(), given.as_bytes()) {
                return Err(wrong_password());
            }
            None
        }
        UserAuth::Fetched(FetchedSecret::Scram(secret)) => {
            Some(secret.verify_password(given).ok_or_else(wrong_password)?)
        }
        UserAuth::Fetched(FetchedSecret::Md5(secret)) => {
            if !wire::md5::verify_password(secret, &user.db_user, given) {
                return Err(wrong_password());
            }
            None
        }
    };
    Authentication::Ok.encode(done);
    Ok(client_key)
}
