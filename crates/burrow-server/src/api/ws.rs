//! Bridges a WebSocket to a process stream in the guest (exec, attach, terminal).

use axum::extract::ws::{Message, WebSocket};
use burrow_node::guest::{ExecEvent, ExecInput, ExecOutput};
use burrow_types::stream::{StreamEvent, StreamInput, STREAM_STDERR, STREAM_STDOUT};
use burrow_types::{codes, PtySize};
use futures_util::{SinkExt, StreamExt};

use crate::control::error_chain;

fn text(ev: &StreamEvent) -> Message {
    Message::Text(serde_json::to_string(ev).unwrap_or_default().into())
}

fn framed(tag: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(tag);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// Sends an error event and closes; used when the stream cannot start.
pub async fn fail(mut socket: WebSocket, code: &str, message: String) {
    let _ = socket
        .send(text(&StreamEvent::Error {
            code: code.to_string(),
            message,
        }))
        .await;
    let _ = socket.close().await;
}

/// Runs until the process exits or the client goes away. Output is read in its own task so a
/// half-read guest frame is never abandoned; when the client leaves, dropping the guest connection
/// ends a foreground process (the guest kills its group).
pub async fn pump(socket: WebSocket, mut input: ExecInput, mut output: ExecOutput) {
    let (mut sink, mut stream) = socket.split();
    let mut to_client = tokio::spawn(async move {
        loop {
            let msg = match output.next().await {
                Ok(Some(ExecEvent::Started { pid })) => text(&StreamEvent::Started { pid }),
                Ok(Some(ExecEvent::Stdout(b))) => framed(STREAM_STDOUT, &b),
                Ok(Some(ExecEvent::Stderr(b))) => framed(STREAM_STDERR, &b),
                Ok(Some(ExecEvent::Exited {
                    exit_code,
                    signal,
                    timed_out,
                })) => {
                    let _ = sink
                        .send(text(&StreamEvent::Exit {
                            exit_code,
                            signal,
                            timed_out,
                        }))
                        .await;
                    break;
                }
                // The guest went away (or sent garbage) before the exit: say so, then stop.
                other => {
                    let message = match other {
                        Err(e) => error_chain(&e),
                        _ => "the guest agent closed the stream".to_string(),
                    };
                    let event = StreamEvent::Error {
                        code: codes::GUEST_UNREACHABLE.into(),
                        message,
                    };
                    let _ = sink.send(text(&event)).await;
                    break;
                }
            };
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    loop {
        tokio::select! {
            _ = &mut to_client => {
                // The exit event and a Close frame are sent. Read until the client closes too: a
                // socket dropped with unread input is reset, and a reset can discard the exit
                // event before the client reads it.
                let drain = async { while let Some(Ok(m)) = stream.next().await { if matches!(m, Message::Close(_)) { break } } };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
                return;
            }
            msg = stream.next() => match msg {
                // Input errors (stdin already closed, process gone) are not fatal: the exit event
                // is still on its way to the client.
                Some(Ok(Message::Binary(b))) => { let _ = input.stdin(&b).await; }
                Some(Ok(Message::Text(t))) => {
                    // A malformed control message is ignored rather than ending the process.
                    let _ = match serde_json::from_str::<StreamInput>(&t) {
                        Ok(StreamInput::Eof) => input.close_stdin().await,
                        Ok(StreamInput::Resize { cols, rows }) => input.resize(PtySize { cols, rows }).await,
                        Ok(StreamInput::Signal { signal }) => input.signal(signal).await,
                        Err(_) => Ok(()),
                    };
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            },
        }
    }
    // The client is gone (or stdin failed): stop forwarding output, drop the guest connection.
    to_client.abort();
}
