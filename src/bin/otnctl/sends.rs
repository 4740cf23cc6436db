//! `otnctl send …` (watch included) and `otnctl deliveries …`.

use std::io::{self, Write};

use otnd::{
    pb::{self, SendState},
    progress::{SendBar, state_name},
};
use tonic::Code;

use crate::{
    ExitCode, Outcome, check_list,
    cli::{DeliveriesCommand, ExportFormat, Output, SendCommand},
    client::{Conn, Failure},
    id, list_pages,
    output::{self, DeliveryRow, SendRow},
    page_id, usage_error,
};

/// The most deliveries one ListDeliveries call returns: an export reads this many at a time.
const EXPORT_PAGE_SIZE: i32 = 1000;
const REQUEST_ID_MAX_CHARS: usize = 128;

pub async fn run(command: SendCommand, output: Output, conn: &Conn) -> Outcome {
    match command {
        SendCommand::Start {
            story,
            request_id,
            watch: follow,
        } => {
            let story_id = id("STORY", &story);
            let request_id = match request_id {
                Some(request_id) => {
                    let len = request_id.chars().count();
                    if len == 0 || len > REQUEST_ID_MAX_CHARS || request_id.contains('\0') {
                        usage_error(format!(
                            "--request-id: must be 1 to {REQUEST_ID_MAX_CHARS} characters \
                             without NUL, got {len}"
                        ));
                    }
                    request_id
                }
                None => uuid::Uuid::new_v4().to_string(),
            };
            let send = conn
                .sends()
                .await?
                .start_send(pb::StartSendRequest {
                    story_id,
                    request_id,
                })
                .await?
                .into_inner()
                .send
                .unwrap_or_default();
            if follow {
                eprintln!("started send {}", send.send_id);
                return watch(conn, send.send_id, output).await;
            }
            output::one(output, &SendRow::from(send));
        }
        SendCommand::Get { send } => {
            let send = get(conn, id("SEND", &send)).await?;
            output::one(output, &SendRow::from(send));
        }
        SendCommand::List {
            page,
            story,
            state,
            list,
        } => {
            let page_id = page_id(&page);
            let story_id = story.map(|s| id("--story", &s)).unwrap_or_default();
            let state = state.map_or(SendState::Unspecified, SendState::from);
            check_list(&list);
            let client = conn.sends().await?;
            let sends = list_pages(&list, |page_size, page_token| {
                let mut client = client.clone();
                let request = pb::ListSendsRequest {
                    page_id: page_id.clone(),
                    story_id: story_id.clone(),
                    state: state.into(),
                    page_size,
                    page_token,
                };
                async move {
                    let answer = client.list_sends(request).await?.into_inner();
                    Ok((answer.sends, answer.next_page_token))
                }
            })
            .await?;
            let rows: Vec<SendRow> = sends.into_iter().map(SendRow::from).collect();
            output::many(output, &rows, "sends");
        }
        SendCommand::Pause { send } => {
            let send_id = id("SEND", &send);
            let send = conn
                .sends()
                .await?
                .pause_send(pb::PauseSendRequest { send_id })
                .await?
                .into_inner()
                .send
                .unwrap_or_default();
            output::one(output, &SendRow::from(send));
        }
        SendCommand::Resume { send } => {
            let send_id = id("SEND", &send);
            let send = conn
                .sends()
                .await?
                .resume_send(pb::ResumeSendRequest { send_id })
                .await?
                .into_inner()
                .send
                .unwrap_or_default();
            output::one(output, &SendRow::from(send));
        }
        SendCommand::Cancel { send } => {
            let send_id = id("SEND", &send);
            let send = conn
                .sends()
                .await?
                .cancel_send(pb::CancelSendRequest { send_id })
                .await?
                .into_inner()
                .send
                .unwrap_or_default();
            output::one(output, &SendRow::from(send));
        }
        SendCommand::Watch { send } => {
            let send_id = id("SEND", &send);
            return watch(conn, send_id, output).await;
        }
    }
    Ok(ExitCode::Success)
}

async fn get(conn: &Conn, send_id: String) -> Result<pb::Send, Failure> {
    Ok(conn
        .sends()
        .await?
        .get_send(pb::GetSendRequest { send_id })
        .await?
        .into_inner()
        .send
        .unwrap_or_default())
}

/// Follows WatchSend with a progress bar until the send completes, is cancelled or halts (a
/// halted send waits for an operator, so watching it ends there too). With `--output json` the
/// final send is printed to stdout for scripts.
async fn watch(conn: &Conn, send_id: String, output: Output) -> Outcome {
    let mut stream = conn
        .sends()
        .await?
        .watch_send(pb::WatchSendRequest {
            send_id: send_id.clone(),
        })
        .await?
        .into_inner();
    let bar = SendBar::new(&send_id);
    let mut last: Option<pb::SendProgress> = None;
    let ended = loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let progress = message.progress.unwrap_or_default();
                bar.update(&progress);
                let state = progress.state();
                last = Some(progress);
                if matches!(
                    state,
                    SendState::Completed | SendState::Cancelled | SendState::Halted
                ) {
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(Failure::from(status)),
        }
    };
    let Some(progress) = last else {
        ended?;
        return Err(Failure::new(
            Code::Unavailable,
            "the progress stream ended before it said anything",
        ));
    };
    bar.finish(&progress);
    ended?;
    let code = match progress.state() {
        SendState::Completed => ExitCode::Success,
        SendState::Halted => ExitCode::Halted,
        SendState::Cancelled => ExitCode::Cancelled,
        _ => {
            return Err(Failure::new(
                Code::Unavailable,
                format!(
                    "the progress stream ended while the send was {}; watch it again",
                    state_name(progress.state)
                ),
            ));
        }
    };
    if output == Output::Json {
        let send = get(conn, send_id).await?;
        output::one(output, &SendRow::from(send));
    }
    Ok(code)
}

pub async fn deliveries(command: DeliveriesCommand, output: Output, conn: &Conn) -> Outcome {
    match command {
        DeliveriesCommand::List { send, state, list } => {
            let send_id = id("SEND", &send);
            let state = state.map_or(pb::DeliveryState::Unspecified, pb::DeliveryState::from);
            check_list(&list);
            let client = conn.sends().await?;
            let deliveries = list_pages(&list, |page_size, page_token| {
                let mut client = client.clone();
                let request = pb::ListDeliveriesRequest {
                    send_id: send_id.clone(),
                    state: state.into(),
                    page_size,
                    page_token,
                };
                async move {
                    let answer = client.list_deliveries(request).await?.into_inner();
                    Ok((answer.deliveries, answer.next_page_token))
                }
            })
            .await?;
            let rows: Vec<DeliveryRow> = deliveries.into_iter().map(DeliveryRow::from).collect();
            output::many(output, &rows, "deliveries");
        }
        DeliveriesCommand::Export {
            send,
            format,
            state,
        } => {
            let send_id = id("SEND", &send);
            let state = state.map_or(pb::DeliveryState::Unspecified, pb::DeliveryState::from);
            let count = export(conn, send_id, state, format).await?;
            eprintln!("exported {count} deliveries");
        }
    }
    Ok(ExitCode::Success)
}

/// Every delivery to stdout, one page of ListDeliveries at a time: each page is written and
/// flushed before the next is asked for, so no more than one page is ever held.
async fn export(
    conn: &Conn,
    send_id: String,
    state: pb::DeliveryState,
    format: ExportFormat,
) -> Result<u64, Failure> {
    let mut client = conn.sends().await?;
    let mut csv = csv::Writer::from_writer(io::stdout());
    let mut count = 0u64;
    let mut page_token = String::new();
    loop {
        let page = client
            .list_deliveries(pb::ListDeliveriesRequest {
                send_id: send_id.clone(),
                state: state.into(),
                page_size: EXPORT_PAGE_SIZE,
                page_token,
            })
            .await?
            .into_inner();
        let mut stdout = io::stdout().lock();
        for delivery in page.deliveries {
            let row = DeliveryRow::from(delivery);
            let written = match format {
                ExportFormat::Csv => csv.serialize(&row).map_err(csv_io),
                ExportFormat::Jsonl => serde_json::to_writer(&mut stdout, &row)
                    .map_err(io::Error::from)
                    .and_then(|()| stdout.write_all(b"\n")),
            };
            written.unwrap_or_else(|e| output::stdout_failed(e));
            count += 1;
        }
        if format == ExportFormat::Csv && count == 0 && page.next_page_token.is_empty() {
            // An empty export is still a CSV file: its header alone.
            stdout
                .write_all(csv_header().as_bytes())
                .and_then(|()| stdout.flush())
                .unwrap_or_else(|e| output::stdout_failed(e));
            return Ok(0);
        }
        csv.flush()
            .and_then(|()| stdout.flush())
            .unwrap_or_else(|e| output::stdout_failed(e));
        if page.next_page_token.is_empty() {
            return Ok(count);
        }
        page_token = page.next_page_token;
    }
}

fn csv_io(e: csv::Error) -> io::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

/// The CSV header line of a delivery row, as the writer puts it above the first row.
fn csv_header() -> String {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .serialize(DeliveryRow::default())
        .expect("a delivery row serializes");
    let text = writer
        .into_inner()
        .map(|bytes| String::from_utf8(bytes).unwrap_or_default())
        .unwrap_or_default();
    text.lines()
        .next()
        .map(|line| format!("{line}\n"))
        .unwrap_or_default()
}
