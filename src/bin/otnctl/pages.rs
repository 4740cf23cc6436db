//! `otnctl pages …`, `otnctl topics PAGE` and `otnctl optins list`.

use otnd::{
    domain::{PageName, SendRate},
    pb,
};

use crate::{
    ExitCode, Outcome, check, check_list,
    cli::{OptInsCommand, Output, PagesCommand},
    client::Conn,
    list_pages,
    output::{self, OptInRow, PageRow, TopicRow},
    page_id, psid, secrets, topic, usage_error,
};

pub async fn run(command: PagesCommand, output: Output, conn: &Conn) -> Outcome {
    match command {
        PagesCommand::List(list) => {
            check_list(&list);
            let client = conn.pages().await?;
            let pages = list_pages(&list, |page_size, page_token| {
                let mut client = client.clone();
                async move {
                    let answer = client
                        .list_pages(pb::ListPagesRequest {
                            page_size,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((answer.pages, answer.next_page_token))
                }
            })
            .await?;
            let rows: Vec<PageRow> = pages.into_iter().map(PageRow::from).collect();
            output::many(output, &rows, "pages");
        }
        PagesCommand::Get { page } => {
            let page_id = page_id(&page);
            let page = conn
                .pages()
                .await?
                .get_page(pb::GetPageRequest { page_id })
                .await?
                .into_inner()
                .page
                .unwrap_or_default();
            output::one(output, &PageRow::from(page));
        }
        PagesCommand::Create {
            page,
            name,
            rate,
            secrets,
        } => {
            let page_id = page_id(&page);
            check("--name", PageName::parse(&name));
            if let Some(rate) = rate {
                check("--rate", SendRate::parse(rate));
            }
            let [access_token, app_secret, verify_token] = page_secrets(
                [
                    secrets.access_token.as_deref(),
                    secrets.app_secret.as_deref(),
                    secrets.verify_token.as_deref(),
                ],
                [
                    secrets.access_token_file.as_deref(),
                    secrets.app_secret_file.as_deref(),
                    secrets.verify_token_file.as_deref(),
                ],
            );
            let Some(access_token) = access_token else {
                usage_error(
                    "the page access token is required: --access-token, OTN_PAGE_ACCESS_TOKEN or \
                     --access-token-file",
                )
            };
            let Some(app_secret) = app_secret else {
                usage_error(
                    "the app secret is required: --app-secret, OTN_PAGE_APP_SECRET or \
                     --app-secret-file",
                )
            };
            let page = conn
                .pages()
                .await?
                .create_page(pb::CreatePageRequest {
                    page_id,
                    name,
                    access_token,
                    app_secret,
                    verify_token: verify_token.unwrap_or_default(),
                    send_rate_per_second: rate,
                })
                .await?
                .into_inner()
                .page
                .unwrap_or_default();
            output::one(output, &PageRow::from(page));
        }
        PagesCommand::Update {
            page,
            name,
            rate,
            secrets,
            clear_verify_token,
        } => {
            let page_id = page_id(&page);
            if let Some(name) = &name {
                check("--name", PageName::parse(name));
            }
            if let Some(rate) = rate {
                check("--rate", SendRate::parse(rate));
            }
            let [access_token, app_secret, verify_token] = page_secrets(
                [
                    secrets.access_token.as_deref(),
                    secrets.app_secret.as_deref(),
                    secrets.verify_token.as_deref(),
                ],
                [
                    secrets.access_token_file.as_deref(),
                    secrets.app_secret_file.as_deref(),
                    secrets.verify_token_file.as_deref(),
                ],
            );
            let verify_token = if clear_verify_token {
                Some(String::new())
            } else {
                verify_token
            };
            let request = pb::UpdatePageRequest {
                page_id,
                name,
                access_token,
                app_secret,
                verify_token,
                send_rate_per_second: rate,
            };
            if request.name.is_none()
                && request.access_token.is_none()
                && request.app_secret.is_none()
                && request.verify_token.is_none()
                && request.send_rate_per_second.is_none()
            {
                usage_error(
                    "nothing to change: give --name, --rate, a secret or --clear-verify-token",
                );
            }
            let page = conn
                .pages()
                .await?
                .update_page(request)
                .await?
                .into_inner()
                .page
                .unwrap_or_default();
            output::one(output, &PageRow::from(page));
        }
        PagesCommand::Delete { page } => {
            let page_id = page_id(&page);
            conn.pages()
                .await?
                .delete_page(pb::DeletePageRequest {
                    page_id: page_id.clone(),
                })
                .await?;
            eprintln!("deleted page {page_id}");
        }
    }
    Ok(ExitCode::Success)
}

pub async fn topics(page: &str, output: Output, conn: &Conn) -> Outcome {
    let page_id = page_id(page);
    let topics = conn
        .optins()
        .await?
        .list_topics(pb::ListTopicsRequest { page_id })
        .await?
        .into_inner()
        .topics;
    let rows: Vec<TopicRow> = topics.into_iter().map(TopicRow::from).collect();
    output::many(output, &rows, "topics");
    Ok(ExitCode::Success)
}

pub async fn optins(command: OptInsCommand, output: Output, conn: &Conn) -> Outcome {
    let OptInsCommand::List {
        page,
        topic: wanted_topic,
        psid: wanted_psid,
        state,
        kind,
        list,
    } = command;
    let page_id = page_id(&page);
    let wanted_topic = wanted_topic
        .map(|t| topic("--topic", &t))
        .unwrap_or_default();
    let wanted_psid = wanted_psid.map(|p| psid("--psid", &p)).unwrap_or_default();
    let state = state.map_or(pb::OptInState::Unspecified, pb::OptInState::from);
    check_list(&list);
    let client = conn.optins().await?;
    let opt_ins = list_pages(&list, |page_size, page_token| {
        let mut client = client.clone();
        let request = pb::ListOptInsRequest {
            page_id: page_id.clone(),
            topic: wanted_topic.clone(),
            psid: wanted_psid.clone(),
            state: state.into(),
            kind: kind
                .map_or(pb::TokenKind::Unspecified, pb::TokenKind::from)
                .into(),
            page_size,
            page_token,
        };
        async move {
            let answer = client.list_opt_ins(request).await?.into_inner();
            Ok((answer.opt_ins, answer.next_page_token))
        }
    })
    .await?;
    let rows: Vec<OptInRow> = opt_ins.into_iter().map(OptInRow::from).collect();
    output::many(output, &rows, "opt-ins");
    Ok(ExitCode::Success)
}

/// The page's three secrets (access token, app secret, verify token), each from its flag (or
/// variable) or its file; create and update take them the same way.
fn page_secrets(
    values: [Option<&str>; 3],
    files: [Option<&std::path::Path>; 3],
) -> [Option<String>; 3] {
    const FLAGS: [&str; 3] = ["--access-token", "--app-secret", "--verify-token"];
    secrets::read(std::array::from_fn(|i| secrets::Source {
        flag: FLAGS[i],
        value: values[i],
        file: files[i],
    }))
}
